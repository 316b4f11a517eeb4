"""Real PLC stand-ins for the bridge tests: a pymodbus TCP server and an asyncua server, each with a small
"PLC program" (a client of its own, as a PLC task would be) that reads a result when result valid rises
and acknowledges it. Everything runs on loopback in a background event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from asyncua import Client, Server, ua
from asyncua.common.callback import CallbackType
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from consumers.plc.modbus import from_i32, from_u32
from crd_model.stream.settings import ModbusSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `cond` until it returns something truthy (returned), or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


class LoopThread:
    """An asyncio loop on a daemon thread; `call` runs a coroutine there and returns its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine, timeout: float = 20.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


@dataclass
class Seen:
    """One result as the PLC program read it when result valid rose."""

    line: str
    sequence: int
    verdict_code: int
    reject: bool
    reject_register: int
    score: int
    threshold: int
    capture_seq: int
    part_id: str
    t: float = field(default_factory=time.time)  # when the PLC program read it


@dataclass
class ModbusPlc:
    """A Modbus TCP PLC: memory (coils + holding registers) and a program that acks results.

    `acking=False` makes it stop acknowledging (a PLC in stop, or a stuck task); `ack_delay_s` makes it slow.
    `stop()` is a PLC outage; `start()` again is a restarted PLC with fresh memory.
    """

    lines: list[str]
    cfg: ModbusSettings
    ack_delay_s: float = 0.0
    acking: bool = True
    seen: list[Seen] = field(default_factory=list)
    writes: list[tuple[float, int, int, list]] = field(default_factory=list)  # (t, function code, address, values)

    def __post_init__(self) -> None:
        self.lt = LoopThread()
        self.server: ModbusTcpServer | None = None
        self._program: asyncio.Task | None = None

    def reg(self, line: str, offset: int) -> int:
        return self.cfg.register_base + self.lines.index(line) * self.cfg.line_register_stride + offset

    def coil(self, line: str, offset: int) -> int:
        return self.cfg.coil_base + self.lines.index(line) * self.cfg.line_coil_stride + offset

    async def _action(self, fc: int, start: int, address: int, count: int, regs: list, values: list | None) -> None:
        if values is not None:
            self.writes.append((time.monotonic(), fc, address, list(values)))

    async def _start(self) -> None:
        memory = (
            [SimData(0, count=512, values=False, datatype=DataType.BITS)],
            [SimData(0, count=16, values=False, datatype=DataType.BITS)],
            [SimData(0, count=1024, values=0, datatype=DataType.REGISTERS)],
            [SimData(0, count=16, values=0, datatype=DataType.REGISTERS)],
        )
        device = SimDevice(id=self.cfg.device_id, simdata=memory, action=self._action)
        self.server = ModbusTcpServer(device, address=("127.0.0.1", self.cfg.port))
        self._serve = asyncio.create_task(self.server.serve_forever())
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", self.cfg.port), timeout=0.2):
                    break
            except OSError:
                await asyncio.sleep(0.01)
        self.client = AsyncModbusTcpClient("127.0.0.1", port=self.cfg.port, timeout=1, retries=0, reconnect_delay=0)
        await self.client.connect()
        self._program = asyncio.create_task(self._run_program())

    def start(self) -> ModbusPlc:
        self.lt.call(self._start())
        return self

    async def _stop(self) -> None:
        if self._program is not None:
            self._program.cancel()
            self._program = None
        self.client.close()
        if self.server is not None:
            await self.server.shutdown()
            self.server = None

    def stop(self) -> None:
        self.lt.call(self._stop())

    def close(self) -> None:
        if self.server is not None:
            self.stop()
        self.lt.close()

    async def _read_regs(self, address: int, count: int) -> list[int]:
        return (await self.client.read_holding_registers(address, count=count, device_id=self.cfg.device_id)).registers

    async def _read_coil(self, address: int) -> bool:
        return bool((await self.client.read_coils(address, device_id=self.cfg.device_id)).bits[0])

    async def _run_program(self) -> None:
        # A new result is result valid with a sequence not handled yet (the bridge may clear and set valid
        # again faster than one PLC scan, so the sequence, not valid's edge, tells results apart).
        m, handled = self.cfg.map, dict.fromkeys(self.lines, 0)
        while True:
            for line in self.lines:
                valid = await self._read_coil(self.coil(line, m.result_valid_coil))
                if not valid or not self.acking:
                    continue
                regs = await self._read_regs(self.reg(line, 0), m.part_id + m.part_id_registers)
                if from_u32(regs[m.sequence : m.sequence + 2]) == handled[line]:
                    continue
                text = b"".join(r.to_bytes(2, "big") for r in regs[m.part_id : m.part_id + m.part_id_registers])
                self.seen.append(
                    Seen(
                        line,
                        from_u32(regs[m.sequence : m.sequence + 2]),
                        regs[m.verdict_code],
                        await self._read_coil(self.coil(line, m.reject_coil)),
                        regs[m.reject_register],
                        from_i32(regs[m.score : m.score + 2]),
                        from_i32(regs[m.threshold : m.threshold + 2]),
                        from_u32(regs[m.capture_seq : m.capture_seq + 2]),
                        text.rstrip(b"\0").decode(),
                    )
                )
                handled[line] = self.seen[-1].sequence
                if self.ack_delay_s:
                    await asyncio.sleep(self.ack_delay_s)
                while not self.acking:
                    await asyncio.sleep(0.01)
                await self.client.write_coil(self.coil(line, m.result_ack_coil), True, device_id=self.cfg.device_id)
            await asyncio.sleep(0.005)

    # -- what the PLC's memory holds / saw -----------------------------------------------------
    def registers(self, line: str, offset: int, count: int = 1) -> list[int]:
        return self.lt.call(self._read_regs(self.reg(line, offset), count))

    def coil_value(self, line: str, offset: int) -> bool:
        return self.lt.call(self._read_coil(self.coil(line, offset)))

    def reject_pulses(self, line: str) -> list[int]:
        """Sequences for which the reject coil rose from 0 to 1 (written by anyone), from the write log."""
        m, reject_addr, seq_addr = self.cfg.map, self.coil(line, self.cfg.map.reject_coil), self.reg(line, 0)
        state, rose, pulses = False, False, []
        for _, fc, address, values in list(self.writes):
            if fc in (5, 15) and address <= reject_addr < address + len(values):
                new = bool(values[reject_addr - address])
                rose = rose or (new and not state)
                state = new
            elif fc in (6, 16) and address <= seq_addr + m.sequence < address + len(values) and len(values) >= 2:
                if rose:
                    i = seq_addr + m.sequence - address
                    pulses.append(from_u32(values[i : i + 2]))
                    rose = False
        return pulses

    def sequence_writes(self, line: str) -> list[int]:
        """Every value written into the line's sequence registers, in order."""
        addr = self.reg(line, self.cfg.map.sequence)
        return [
            from_u32(values[addr - a : addr - a + 2])
            for _, fc, a, values in list(self.writes)
            if fc in (6, 16) and a <= addr and addr + 1 < a + len(values)
        ]


PLC_NS = "urn:test:plc"
PLC_NODES = {
    "Sequence": ua.VariantType.UInt32, "VerdictCode": ua.VariantType.Int16, "Reject": ua.VariantType.Boolean,
    "Score": ua.VariantType.Int32, "PartId": ua.VariantType.String, "Heartbeat": ua.VariantType.Boolean,
    "Alarm": ua.VariantType.Boolean, "MissingCount": ua.VariantType.UInt16, "ResultValid": ua.VariantType.Boolean,
    "ResultAck": ua.VariantType.Boolean,
}  # fmt: skip


@dataclass
class OpcUaPlc:
    """A PLC's own OPC UA server with Vision.<line>.* variables, and a program that acks results."""

    lines: list[str]
    port: int
    ack_delay_s: float = 0.0
    acking: bool = True
    seen: list[dict] = field(default_factory=list)
    writes: list[tuple[str, object]] = field(default_factory=list)  # (node id, value) written by clients

    def __post_init__(self) -> None:
        self.lt = LoopThread()
        self.server: Server | None = None

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}/plc/"

    async def _postwrite(self, event: Any, _dispatcher: Any) -> None:
        if event.is_external:
            for wv in event.request_params.NodesToWrite:
                self.writes.append((wv.NodeId.Identifier, wv.Value.Value.Value))

    async def _start(self) -> None:
        server = Server()
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        idx = await server.register_namespace(PLC_NS)
        assert idx == 2, idx  # the bridge's default node map says ns=2
        vision = await server.get_objects_node().add_object(ua.NodeId("Vision", idx), f"{idx}:Vision")
        self.nodes: dict[str, dict[str, Any]] = {}
        for line in self.lines:
            obj = await vision.add_object(ua.NodeId(f"Vision.{line}", idx), f"{idx}:{line}")
            self.nodes[line] = {}
            for name, vtype in PLC_NODES.items():
                node = await obj.add_variable(ua.NodeId(f"Vision.{line}.{name}", idx), f"{idx}:{name}",
                                              ua.Variant(ua.get_default_value(vtype), vtype))  # fmt: skip
                await node.set_writable()
                self.nodes[line][name] = node
        server.subscribe_server_callback(CallbackType.PostWrite, self._postwrite)
        await server.start()
        self.server = server
        self._program = asyncio.create_task(self._run_program())

    def start(self) -> OpcUaPlc:
        self.lt.call(self._start())
        return self

    async def _stop(self) -> None:
        self._program.cancel()
        if self.server is not None:
            await self.server.stop()
            self.server = None

    def stop(self) -> None:
        self.lt.call(self._stop())

    def close(self) -> None:
        if self.server is not None:
            self.stop()
        self.lt.close()

    async def _run_program(self) -> None:
        handled = dict.fromkeys(self.lines, 0)
        while True:
            for line in self.lines:
                n = self.nodes[line]
                if not self.acking or not await n["ResultValid"].read_value():
                    continue
                if await n["Sequence"].read_value() == handled[line]:
                    continue
                row = {name: await n[name].read_value() for name in ("Sequence", "VerdictCode", "Reject", "Score",
                                                                     "PartId")}  # fmt: skip
                self.seen.append(row | {"line": line, "t": time.time()})
                handled[line] = row["Sequence"]
                if self.ack_delay_s:
                    await asyncio.sleep(self.ack_delay_s)
                await n["ResultAck"].write_value(ua.Variant(True, ua.VariantType.Boolean))
            await asyncio.sleep(0.005)

    def value(self, line: str, name: str) -> Any:
        return self.lt.call(self.nodes[line][name].read_value())


class OpcUaSubscriber:
    """A PLC/SCADA client of the bridge's own OPC UA server: ResultReady events and LastResult values."""

    def __init__(self, endpoint: str, ns: str, line: str):
        self.endpoint, self.ns, self.line = endpoint, ns, line
        self.events: list[Any] = []
        self.times: list[float] = []  # arrival time of each event
        self.lt = LoopThread()

    async def _connect(self) -> None:
        self.client = Client(self.endpoint, timeout=4)
        await self.client.connect()
        self.idx = await self.client.get_namespace_index(self.ns)
        event_type = await self.client.nodes.base_event_type.get_child(f"{self.idx}:ResultReadyEventType")
        subscriber = self

        class Handler:
            def event_notification(self, event: Any) -> None:
                subscriber.times.append(time.time())
                subscriber.events.append(event)

        self.sub = await self.client.create_subscription(20, Handler())
        await self.sub.subscribe_events(self.client.get_node(ua.NodeId(self.line, self.idx)), event_type)

    def connect(self, timeout: float = 10.0) -> OpcUaSubscriber:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.lt.call(self._connect())
                return self
            except (OSError, TimeoutError, ua.UaError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def read(self, path: str) -> Any:
        return self.lt.call(self.client.get_node(ua.NodeId(f"{self.line}.{path}", self.idx)).read_value())

    def write_ack(self, sequence: int) -> None:
        node = self.client.get_node(ua.NodeId(f"{self.line}.Acknowledge", self.idx))
        self.lt.call(node.write_value(ua.Variant(sequence, ua.VariantType.UInt32)))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.lt.call(self.client.disconnect(), timeout=5)
        self.lt.close()

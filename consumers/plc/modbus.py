"""Modbus TCP (pymodbus client): a line's result in the PLC's holding registers and coils, with the handshake."""

from __future__ import annotations

import asyncio
import logging

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from consumers.plc.adapter import HandshakeAdapter, HandshakeState, LineStatus, PlcUnavailable, plc_request
from consumers.plc.records import PlcResult
from crd_model.stream.settings import ModbusSettings

# pymodbus logs every reconnect attempt and frame dump itself; the bridge logs what matters.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
logging.getLogger("pymodbus.logging").setLevel(logging.CRITICAL)

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def u32(v: int) -> list[int]:
    v %= 2**32
    return [v >> 16, v & 0xFFFF]


def i32(v: int) -> list[int]:
    return u32(max(INT32_MIN, min(INT32_MAX, v)))


def from_u32(regs: list[int]) -> int:
    return (regs[0] << 16) | regs[1]


def from_i32(regs: list[int]) -> int:
    v = from_u32(regs)
    return v - 2**32 if v >= 2**31 else v


def ascii_registers(text: str, n: int) -> list[int]:
    """`text` as ASCII, two characters per register (first in the high byte), NUL-padded to n registers."""
    data = text.encode("ascii", errors="replace")[: 2 * n].ljust(2 * n, b"\0")
    return [(data[i] << 8) | data[i + 1] for i in range(0, 2 * n, 2)]


def scaled(v: float | None, scale: int) -> int:
    return 0 if v is None else round(v * scale)


class ModbusAdapter(HandshakeAdapter):
    name = "modbus"

    def __init__(self, lines: list[str], cfg: ModbusSettings, score_scale: int):
        super().__init__(lines)
        self.cfg, self.m, self.score_scale = cfg, cfg.map, score_scale
        self.poll_s = cfg.poll_ms / 1000.0
        self.client: AsyncModbusTcpClient | None = None
        self._lock = asyncio.Lock()  # one request at a time on the connection, whichever line asks

    @property
    def handshake(self) -> bool:
        return self.cfg.handshake

    def reg(self, line: str, offset: int) -> int:
        return self.cfg.register_base + self.lines.index(line) * self.cfg.line_register_stride + offset

    def coil(self, line: str, offset: int) -> int:
        return self.cfg.coil_base + self.lines.index(line) * self.cfg.line_coil_stride + offset

    async def start(self) -> None:
        # No background reconnects inside pymodbus: the bridge decides when to retry (with backoff).
        self.client = AsyncModbusTcpClient(
            self.cfg.host, port=self.cfg.port, timeout=self.cfg.timeout_s, retries=0, reconnect_delay=0
        )
        try:
            ok = await self.client.connect()
        except (OSError, ModbusException) as exc:
            raise PlcUnavailable(f"modbus connect {self.cfg.host}:{self.cfg.port}: {exc}") from exc
        if not ok:
            raise PlcUnavailable(f"modbus: cannot connect to {self.cfg.host}:{self.cfg.port}")

    async def stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    async def _call(self, what: str, coro_fn, *args, **kwargs):
        if self.client is None or not self.client.connected:
            raise PlcUnavailable(f"modbus: not connected ({what})")
        with plc_request(f"modbus {what}", (OSError, ModbusException, TimeoutError)):
            async with self._lock:
                resp = await coro_fn(*args, device_id=self.cfg.device_id, **kwargs)
        if resp.isError():
            raise PlcUnavailable(f"modbus {what}: the PLC answered {resp}")
        return resp

    async def write_registers(self, address: int, values: list[int]) -> None:
        assert self.client is not None
        await self._call("write registers", self.client.write_registers, address, values)

    async def write_coil(self, address: int, value: bool) -> None:
        assert self.client is not None
        await self._call("write coil", self.client.write_coil, address, value)

    async def read_state(self, line: str) -> HandshakeState:
        assert self.client is not None
        regs = await self._call("read sequence", self.client.read_holding_registers, self.reg(line, self.m.sequence),
                                count=2)  # fmt: skip
        sequence = from_u32(regs.registers)
        if not self.handshake:
            return HandshakeState(sequence)
        valid = await self._call("read coil", self.client.read_coils, self.coil(line, self.m.result_valid_coil))
        ack = await self._call("read coil", self.client.read_coils, self.coil(line, self.m.result_ack_coil))
        return HandshakeState(sequence, bool(valid.bits[0]), bool(ack.bits[0]))

    async def write_result(self, rec: PlcResult) -> None:
        m, line = self.m, rec.line
        fields = {
            m.verdict_code: [rec.verdict_code],
            m.reject_register: [int(rec.reject)],
            m.score: i32(scaled(rec.score, self.score_scale)),
            m.threshold: i32(scaled(rec.threshold, self.score_scale)),
            m.capture_seq: u32(rec.capture_seq or 0),
            m.part_id: ascii_registers(rec.part_id, m.part_id_registers),
        }
        # Contiguous runs in one request each (the default map is one run), the sequence last: a PLC
        # polling the sequence never sees a new number next to the previous result's fields.
        for start, values in _runs(fields):
            await self.write_registers(self.reg(line, start), values)
        await self.write_coil(self.coil(line, m.reject_coil), rec.reject)
        await self.write_registers(self.reg(line, m.sequence), u32(rec.sequence))

    async def set_valid(self, line: str) -> None:
        await self.write_coil(self.coil(line, self.m.result_valid_coil), True)

    async def clear(self, line: str) -> None:
        await self.write_coil(self.coil(line, self.m.result_valid_coil), False)
        await self.write_coil(self.coil(line, self.m.reject_coil), False)
        await self.write_coil(self.coil(line, self.m.result_ack_coil), False)

    async def heartbeat(self, line: str, count: int) -> None:
        await self.write_registers(self.reg(line, self.m.heartbeat), [count % 65536])
        await self.write_coil(self.coil(line, self.m.heartbeat_coil), count % 2 == 1)

    async def set_status(self, line: str, status: LineStatus) -> None:
        bits = int(status.ready) | int(status.alarm) << 1 | int(status.missing_count > 0) << 2
        m = self.m
        regs = {m.status: [bits], m.missing_count: [status.missing_count % 65536],
                m.missing_capture_seq: u32(status.missing_capture_seq)}  # fmt: skip
        for start, values in _runs(regs):
            await self.write_registers(self.reg(line, start), values)
        await self.write_coil(self.coil(line, self.m.alarm_coil), status.alarm)


def _runs(fields: dict[int, list[int]]) -> list[tuple[int, list[int]]]:
    """Merge {address: values} into contiguous (start, values) runs."""
    runs: list[tuple[int, list[int]]] = []
    for start in sorted(fields):
        if runs and runs[-1][0] + len(runs[-1][1]) == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + fields[start])
        else:
            runs.append((start, list(fields[start])))
    return runs

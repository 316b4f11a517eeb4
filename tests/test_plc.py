"""The PLC bridge against real PLC stand-ins on loopback: a pymodbus TCP server (Modbus mode), an asyncua
server (OPC UA client mode) and an asyncua client subscribed to the bridge's own server (server mode)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from consumers.plc.bridge import PlcBridge
from consumers.plc.ledger import ledger_key
from crd_model.stream import ErrorInfo, Result, Timings, pack_result
from crd_model.stream.settings import PlcSettings, Settings
from tests.plc_sims import ModbusPlc, OpcUaPlc, OpcUaSubscriber, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
CODES = {"ok": 1, "anomalous": 2, "error": 3}
FAST = dict(heartbeat_s=0.1, ack_timeout_s=0.6, block_ms=100, missing_timeout_s=0.4, drain_timeout_s=3,
            reconnect_max_backoff_s=0.2)  # fmt: skip


def _with_plc(settings: Settings, **plc) -> Settings:
    """Settings with a validated plc section (nested dicts merge into the defaults)."""
    base = settings.plc.model_dump()
    for k, v in {**FAST, **plc}.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return settings.model_copy(update={"plc": PlcSettings.model_validate(base)})


def publish(r, s: Settings, verdict: str, seq: int, camera: str = "cam1", line: str | None = None) -> str:
    """XADD one result exactly as a worker does (docs/wire-format.md: frame_id, verdict, payload)."""
    line = line or s.line
    now = time.time()
    result = Result(
        frame_id=f"{camera}:{seq}", line=line, camera=camera, seq=seq, category="disc", verdict=verdict,
        score=None if verdict == "error" else (0.9 if verdict == "anomalous" else 0.1234), threshold=0.5,
        model_id="disc-crd-0123456789ab", timings=Timings(captured_at=now - 0.05, finished_at=now),
        error=ErrorInfo(code="bad_rgb", message="broken png") if verdict == "error" else None,
        worker="w1", meta={"part_id": f"P-{seq}"},
    )  # fmt: skip
    fields = {b"frame_id": result.frame_id.encode(), b"verdict": verdict.encode(), b"payload": pack_result(result)}
    return r.xadd(s.streams.key(line, "results"), fields).decode()


class BridgeThread:
    def __init__(self, s: Settings, adapter=None):
        self.bridge = PlcBridge(s, adapter)
        self.thread = threading.Thread(target=self.bridge.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.bridge.health.ready or not self.thread.is_alive(), 20, "bridge ready")
        assert self.thread.is_alive(), "bridge died at start"

    def stop(self) -> None:
        self.bridge.stop()
        self.thread.join(timeout=20)
        assert not self.thread.is_alive(), "bridge did not drain and stop"


@pytest.fixture
def cleanup(settings, r):
    keys: list[str] = []
    yield keys
    for line in {settings.line, *keys}:
        r.delete(settings.streams.key(line, "results"), ledger_key(settings.streams, line, settings.plc.group))


def _pending(r, s: Settings, line: str | None = None) -> int:
    return r.xpending(s.streams.key(line or s.line, "results"), s.plc.group)["pending"]


def _lag(r, s: Settings, line: str | None = None) -> int:
    groups = {g["name"].decode(): g for g in r.xinfo_groups(s.streams.key(line or s.line, "results"))}
    return int(groups[s.plc.group]["lag"] or 0)


# ---- Modbus ---------------------------------------------------------------------------------------
@pytest.fixture
def modbus(settings, cleanup):
    s = _with_plc(settings, protocol="modbus", modbus={"port": free_port(), "poll_ms": 5})
    plc = ModbusPlc([s.line], s.plc.modbus).start()
    yield s, plc
    plc.close()


def test_modbus_ok_anomalous_error_with_handshake(modbus, r):
    s, plc = modbus
    bridge = BridgeThread(s)
    try:
        verdicts = ["ok", "anomalous", "error", "ok", "anomalous"]
        ids = [publish(r, s, v, i) for i, v in enumerate(verdicts)]
        wait_for(lambda: len(plc.seen) == 5 and _pending(r, s) == 0, what="5 results acknowledged")
        assert [x.sequence for x in plc.seen] == [1, 2, 3, 4, 5]
        assert [x.verdict_code for x in plc.seen] == [CODES[v] for v in verdicts]
        # Fail-safe: an error is a reject; the coil and its register mirror agree.
        assert [x.reject for x in plc.seen] == [False, True, True, False, True]
        assert [x.reject_register for x in plc.seen] == [0, 1, 1, 0, 1]
        assert [x.score for x in plc.seen] == [123, 900, 0, 123, 900] and {x.threshold for x in plc.seen} == {500}
        assert [x.part_id for x in plc.seen] == [f"P-{i}" for i in range(5)]
        assert [x.capture_seq for x in plc.seen] == [0, 1, 2, 3, 4]
        assert plc.reject_pulses(s.line) == [2, 3, 5]
        # Handshake complete after the last result: result valid, reject and ack all cleared by the bridge.
        wait_for(lambda: not any(plc.coil_value(s.line, c) for c in (0, 1, 8)), 3, "handshake bits cleared")
        # The bridge's own group on the results stream, never the workers'; everything acknowledged there.
        groups = {g["name"].decode() for g in r.xinfo_groups(s.streams.key(s.line, "results"))}
        assert groups == {"plc-bridge"} and s.streams.group not in groups
        assert r.xpending(s.streams.key(s.line, "results"), "plc-bridge")["pending"] == 0 and len(ids) == 5
        assert bridge.bridge.metrics.rejects.labels(s.line)._value.get() == 3
    finally:
        bridge.stop()


def test_error_can_be_configured_to_pass(settings, cleanup, r):
    s = _with_plc(settings, protocol="modbus", error_is_reject=False, modbus={"port": free_port(), "poll_ms": 5})
    plc = ModbusPlc([s.line], s.plc.modbus).start()
    bridge = BridgeThread(s)
    try:
        publish(r, s, "error", 0)
        publish(r, s, "anomalous", 1)
        wait_for(lambda: len(plc.seen) == 2, what="2 results")
        assert [(x.verdict_code, x.reject) for x in plc.seen] == [(3, False), (2, True)]
    finally:
        bridge.stop()
        plc.close()


def test_slow_plc_buffers_then_alarm_when_it_stops_acking_and_nothing_is_skipped(settings, cleanup, r):
    s = _with_plc(settings, protocol="modbus", buffer_depth=2, modbus={"port": free_port(), "poll_ms": 5})
    plc = ModbusPlc([s.line], s.plc.modbus, ack_delay_s=0.2).start()
    bridge = BridgeThread(s)
    b = bridge.bridge
    try:
        for i in range(3):
            publish(r, s, "ok", i)
        wait_for(lambda: len(plc.seen) == 3 and _pending(r, s) == 0, what="slow PLC keeps up")
        assert not b.status[s.line].alarm  # slow but within ack_timeout_s: no alarm
        plc.acking = False  # the PLC stops acknowledging
        for i in range(3, 10):
            publish(r, s, "anomalous", i)
        wait_for(lambda: b.status[s.line].alarm, 5, "alarm raised")
        assert b.status[s.line].alarm_reason == "plc_not_acking"
        wait_for(lambda: plc.coil_value(s.line, s.plc.modbus.map.alarm_coil), 3, "alarm coil")  # the PLC sees it
        wait_for(lambda: plc.registers(s.line, s.plc.modbus.map.status)[0] & 2, 3, "alarm bit in the status register")
        # Bounded: one result in the handshake + buffer_depth read ahead; the rest waits in the group.
        wait_for(lambda: _pending(r, s) == 1 + 2, 3, "buffer full")
        assert _lag(r, s) == 7 - 3
        time.sleep(0.3)
        assert _pending(r, s) == 3 and len(plc.seen) == 3  # never skipped past the unacked result
        assert plc.registers(s.line, 0, 2) == [0, 4]  # the PLC still holds sequence 4
        plc.acking = True
        wait_for(lambda: len(plc.seen) == 10 and _pending(r, s) == 0 and _lag(r, s) == 0, 15, "catch up")
        assert [x.sequence for x in plc.seen] == list(range(1, 11))
        assert [x.capture_seq for x in plc.seen] == list(range(10))
        wait_for(lambda: not b.status[s.line].alarm, 3, "alarm cleared")
        wait_for(lambda: not plc.coil_value(s.line, s.plc.modbus.map.alarm_coil), 3, "alarm coil cleared")
    finally:
        bridge.stop()
        plc.close()


def test_plc_restart_loses_nothing_and_catches_up_in_order(modbus, r):
    s, plc = modbus
    bridge = BridgeThread(s)
    b = bridge.bridge
    try:
        publish(r, s, "ok", 0)
        publish(r, s, "anomalous", 1)
        wait_for(lambda: len(plc.seen) == 2 and _pending(r, s) == 0, what="first results")
        plc.stop()  # PLC outage
        for i, v in enumerate(["error", "ok", "anomalous", "ok"], start=2):
            publish(r, s, v, i)
        wait_for(lambda: b.status[s.line].alarm and "plc_unreachable" in b.status[s.line].alarm_reason, 5,
                 "unreachable alarm")  # fmt: skip
        assert not b.health.ready
        time.sleep(0.3)
        assert _pending(r, s) + _lag(r, s) == 4  # all waiting in Redis, none acknowledged
        before = len(plc.seen)
        plc.start()  # restarted PLC: fresh memory
        wait_for(lambda: len(plc.seen) == before + 4 and _pending(r, s) == 0 and _lag(r, s) == 0, 15, "catch up")
        assert [x.sequence for x in plc.seen] == [1, 2, 3, 4, 5, 6]
        assert [x.verdict_code for x in plc.seen] == [1, 2, 3, 1, 2, 1]
        wait_for(lambda: not b.status[s.line].alarm and b.health.ready, 3, "alarm cleared, ready")
    finally:
        bridge.stop()


def test_two_lines_through_one_bridge_use_their_own_register_blocks(settings, cleanup, r):
    other = f"{settings.line}b"
    cleanup.append(other)
    s = _with_plc(settings, protocol="modbus", lines=[settings.line, other], modbus={"port": free_port(),
                                                                                    "poll_ms": 5})  # fmt: skip
    plc = ModbusPlc([settings.line, other], s.plc.modbus).start()
    bridge = BridgeThread(s)
    try:
        for i in range(3):
            publish(r, s, "anomalous" if i == 1 else "ok", i, line=settings.line)
            publish(r, s, "error" if i == 2 else "ok", i, camera="cam2", line=other)
        wait_for(lambda: len(plc.seen) == 6, 10, "both lines delivered")
        by_line = {line: [(x.sequence, x.verdict_code) for x in plc.seen if x.line == line] for line in s.plc.lines}
        assert by_line == {settings.line: [(1, 1), (2, 2), (3, 1)], other: [(1, 1), (2, 1), (3, 3)]}
        assert plc.registers(other, 0, 2) == [0, 3] and plc.reg(other, 0) == 100  # line 2: registers 100..
        wait_for(lambda: _pending(r, s) == 0 and _pending(r, s, other) == 0, 5, "both acknowledged")
    finally:
        bridge.stop()
        plc.close()


def test_unreachable_plc_at_start_is_not_ready_and_sigterm_still_stops_it(settings, cleanup):
    s = _with_plc(settings, protocol="modbus", modbus={"port": free_port()})  # nothing listens there
    bridge = PlcBridge(s)
    thread = threading.Thread(target=bridge.run, daemon=True)
    thread.start()
    wait_for(lambda: bridge.metrics.reconnects._value.get() >= 2, 10, "retrying")
    assert not bridge.health.ready and bridge.health.alive and "plc" in bridge.health.reason
    bridge.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_a_plc_library_that_swallows_the_shutdown_cancel_does_not_hang_the_bridge(modbus, r):
    # pymodbus waits for each response with asyncio.wait_for, which on Python 3.11 can swallow a
    # cancellation that arrives as the response does (CPython gh-86296). The heartbeat loop then went on
    # forever and the bridge never stopped (a flaky CI run: "bridge did not drain and stop"). Here the
    # adapter swallows it on purpose, every time the cancel lands in a heartbeat.
    import asyncio

    from consumers.plc.modbus import ModbusAdapter

    class SwallowingModbus(ModbusAdapter):
        swallowed = 0

        async def heartbeat(self, line: str, count: int) -> None:
            try:
                await super().heartbeat(line, count)
                await asyncio.sleep(0.5)  # most of the loop's time is in here: the cancel lands here
            except asyncio.CancelledError:
                SwallowingModbus.swallowed += 1

    s, plc = modbus
    bridge = BridgeThread(s, SwallowingModbus([s.line], s.plc.modbus, s.plc.score_scale))
    publish(r, s, "ok", 0)
    wait_for(lambda: len(plc.seen) == 1 and _pending(r, s) == 0, what="delivered")
    started = time.monotonic()
    bridge.bridge.stop()
    bridge.thread.join(timeout=15)
    assert not bridge.thread.is_alive(), "bridge did not stop"
    assert SwallowingModbus.swallowed >= 1  # the cancellation was swallowed, and the bridge still stopped
    assert time.monotonic() - started < 3  # not the bridge's 5 s bound on a stuck task: the loop ended


def _swallowing_the_cancel(request, swallowed: list):
    """`request` behind a wait that swallows a cancel and answers anyway, as pymodbus's and asyncua's
    asyncio.wait_for can on Python 3.11 when the cancel meets the answer."""
    import asyncio

    async def wrapped(*args, **kwargs):
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            swallowed.append(True)
        return await request(*args, **kwargs)

    return wrapped


async def _cancel_and_expect_it_handed_on(call) -> None:
    """Start `call()`, cancel it while its request waits: the task must end cancelled, not answer."""
    import asyncio

    task = asyncio.ensure_future(call())
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)


def test_the_modbus_adapter_hands_on_a_cancel_that_its_request_swallowed(modbus):
    # The adapter-level mend of the case above: a request that swallows the cancel and answers anyway
    # must not turn into a normal return, so the task that was cancelled ends.
    import asyncio

    from consumers.plc.modbus import ModbusAdapter

    s, _plc = modbus
    swallowed = []

    async def scenario():
        adapter = ModbusAdapter([s.line], s.plc.modbus, s.plc.score_scale)
        await adapter.start()
        try:
            read = adapter.client.read_holding_registers
            swallowing = _swallowing_the_cancel(read, swallowed)
            await _cancel_and_expect_it_handed_on(lambda: adapter._call("read", swallowing, 0, count=1))
            # Without a cancel the same request answers normally.
            assert not (await adapter._call("read", read, 0, count=1)).isError()
        finally:
            await adapter.stop()

    asyncio.run(scenario())
    assert swallowed == [True]


def test_heartbeat_counts_and_toggles(modbus, r):
    s, plc = modbus
    bridge = BridgeThread(s)
    try:
        m = s.plc.modbus.map
        first = wait_for(lambda: plc.registers(s.line, m.heartbeat)[0], 3, "heartbeat")
        wait_for(lambda: plc.registers(s.line, m.heartbeat)[0] >= first + 3, 3, "heartbeat counting")
        seen = {plc.coil_value(s.line, m.heartbeat_coil) for _ in range(40) if not time.sleep(0.02)}
        assert seen == {True, False}  # the toggling bit
        assert plc.registers(s.line, m.status)[0] & 1  # ready
    finally:
        bridge.stop()


def test_missing_result_is_reported_after_the_timeout(modbus, r):
    s, plc = modbus
    bridge = BridgeThread(s)
    b = bridge.bridge
    try:
        m = s.plc.modbus.map
        for seq in (0, 1, 3):  # capture 2 never gets a result
            publish(r, s, "ok", seq)
        wait_for(lambda: b.status[s.line].missing_count == 1, 5, "missing result reported")
        wait_for(lambda: plc.registers(s.line, m.missing_count)[0] == 1, 3, "missing count at the PLC")
        assert plc.registers(s.line, m.missing_capture_seq, 2) == [0, 2]
        assert plc.registers(s.line, m.status)[0] & 4
        # A late result within the timeout closes its gap: nothing more is reported.
        for seq in (4, 6, 5):
            publish(r, s, "ok", seq)
        wait_for(lambda: len(plc.seen) == 6, what="all delivered")
        time.sleep(s.plc.missing_timeout_s + 0.4)
        assert b.status[s.line].missing_count == 1
        assert b.metrics.missing.labels(s.line)._value.get() == 1
    finally:
        bridge.stop()


def _spawn_bridge(s: Settings, log_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRD_") and k != "REDIS_URL"}
    env.update(
        PYTHONPATH=str(ROOT), REDIS_URL=s.redis.url, CRD_LINE=s.line, CRD_PLC__PROTOCOL="modbus",
        CRD_PLC__MODBUS__PORT=str(s.plc.modbus.port), CRD_PLC__MODBUS__POLL_MS="5", CRD_PLC__HEARTBEAT_S="0.1",
        CRD_PLC__BLOCK_MS="100", CRD_PLC__RECONNECT_MAX_BACKOFF_S="0.2",
    )  # fmt: skip
    with open(log_path, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "crd_model.cli", "plc", "--plain-logs"], env=env, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip


def test_bridge_sigkill_between_plc_write_and_xack_neither_loses_nor_doubles_a_reject(modbus, r, tmp_path):
    s, plc = modbus
    key = s.streams.key(s.line, "results")
    log_path = tmp_path / "bridge.log"
    proc = _spawn_bridge(s, log_path)
    try:
        wait_for(lambda: any(g["name"] == b"plc-bridge" for g in r.xinfo_groups(key)) if r.exists(key) else False,
                 20, "bridge group")  # fmt: skip
        publish(r, s, "ok", 0)
        wait_for(lambda: len(plc.seen) == 1, 10, "first result")
        plc.acking = False
        anomalous = publish(r, s, "anomalous", 1)  # the PLC sees it (reject set, valid set) but does not ack
        publish(r, s, "error", 2)
        publish(r, s, "anomalous", 3)
        wait_for(lambda: len(plc.seen) == 1 and plc.coil_value(s.line, 0) and plc.registers(s.line, 0, 2) == [0, 2],
                 5, "result 2 written and valid")  # fmt: skip
        assert plc.coil_value(s.line, s.plc.modbus.map.reject_coil)
        os.kill(proc.pid, signal.SIGKILL)  # after the PLC write, before any ack / XACK
        proc.wait(timeout=10)
        pending = [p["message_id"].decode() for p in r.xpending_range(key, "plc-bridge", "-", "+", 10)]
        assert anomalous in pending  # not acknowledged: the PLC had not confirmed it
        plc.acking = True  # the PLC acks while no bridge runs (its program reads valid + data as before)
        wait_for(lambda: len(plc.seen) == 2, 5, "PLC read result 2")
        proc = _spawn_bridge(s, log_path)
        wait_for(lambda: len(plc.seen) == 4 and _pending(r, s) == 0, 20, "all delivered after the restart")
        assert [x.sequence for x in plc.seen] == [1, 2, 3, 4]
        assert [x.verdict_code for x in plc.seen] == [1, 2, 3, 2]
        assert plc.reject_pulses(s.line) == [2, 3, 4]  # each reject pulsed exactly once
        assert plc.sequence_writes(s.line).count(2) == 1  # result 2 was not written again
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert "resumed=True" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- OPC UA: client mode (writes into the PLC's server) -------------------------------------------
def test_opcua_client_writes_results_into_the_plcs_nodes_with_handshake(settings, cleanup, r):
    port = free_port()
    names = dict(alarm="Alarm", missing_count="MissingCount", result_valid="ResultValid", result_ack="ResultAck")
    nodes = {k: f"ns=2;s=Vision.{{line}}.{v}" for k, v in names.items()}
    plc = OpcUaPlc([settings.line], port, ack_delay_s=0.05).start()
    s = _with_plc(settings, protocol="opcua-client",
                  opcua_client={"endpoint": plc.endpoint, "nodes": nodes, "poll_ms": 5})  # fmt: skip
    bridge = BridgeThread(s)
    try:
        verdicts = ["ok", "anomalous", "error"]
        for i, v in enumerate(verdicts):
            publish(r, s, v, i)
        wait_for(lambda: len(plc.seen) == 3 and _pending(r, s) == 0, 10, "3 results acknowledged")
        assert [x["Sequence"] for x in plc.seen] == [1, 2, 3]
        assert [x["VerdictCode"] for x in plc.seen] == [1, 2, 3]
        assert [x["Reject"] for x in plc.seen] == [False, True, True]
        assert [x["Score"] for x in plc.seen] == [123, 900, 0]  # an Int32 node gets score x score_scale
        assert [x["PartId"] for x in plc.seen] == ["P-0", "P-1", "P-2"]
        sequences = [v for n, v in plc.writes if n == f"Vision.{s.line}.Sequence"]
        assert sequences == [1, 2, 3]  # each written once
        wait_for(lambda: not plc.value(s.line, "ResultValid") and not plc.value(s.line, "ResultAck"), 3, "cleared")
        beats = {plc.value(s.line, "Heartbeat") for _ in range(30) if not time.sleep(0.02)}
        assert beats == {True, False}  # a Boolean heartbeat node toggles
        plc.stop()  # PLC restart: results wait, then arrive in order
        publish(r, s, "anomalous", 3)
        wait_for(lambda: bridge.bridge.status[s.line].alarm, 5, "unreachable alarm")
        plc.start()
        wait_for(lambda: len(plc.seen) == 4 and _pending(r, s) == 0, 15, "delivered after the PLC restart")
        assert plc.seen[-1]["Sequence"] == 4 and plc.seen[-1]["Reject"] is True
    finally:
        bridge.stop()
        plc.close()


def test_the_opcua_client_hands_on_a_cancel_that_its_request_swallowed(settings):
    # As the Modbus case: asyncua's requests wait with asyncio.wait_for too.
    import asyncio

    from consumers.plc.opcua_client import OpcUaClientAdapter

    plc = OpcUaPlc([settings.line], free_port()).start()
    s = _with_plc(settings, protocol="opcua-client", opcua_client={"endpoint": plc.endpoint})
    swallowed = []

    async def scenario():
        adapter = OpcUaClientAdapter([s.line], s.plc.opcua_client, s.plc.score_scale)
        await adapter.start()
        try:
            read_values = adapter.client.read_values
            adapter.client.read_values = _swallowing_the_cancel(read_values, swallowed)
            await _cancel_and_expect_it_handed_on(lambda: adapter._read(s.line, [adapter.nodes.sequence]))
            adapter.client.read_values = read_values
            assert await adapter._read(s.line, [adapter.nodes.sequence]) == [0]  # answers without a cancel
        finally:
            await adapter.stop()

    try:
        asyncio.run(scenario())
    finally:
        plc.close()
    assert swallowed == [True]


# ---- OPC UA: server mode (the bridge is the server, a PLC subscribes) ------------------------------
def test_opcua_server_events_last_result_counters_and_restart(settings, cleanup, r):
    port = free_port()
    s = _with_plc(settings, protocol="opcua-server",
                  opcua_server={"endpoint": f"opc.tcp://127.0.0.1:{port}/crd-inspect/"})  # fmt: skip
    bridge = BridgeThread(s)
    client = OpcUaSubscriber(s.plc.opcua_server.endpoint, s.plc.opcua_server.namespace_uri, s.line).connect()
    try:
        for i, v in enumerate(["ok", "anomalous", "error"]):
            publish(r, s, v, i)
        wait_for(lambda: len(client.events) == 3 and _pending(r, s) == 0, 10, "3 ResultReady events")
        ev = client.events
        assert [e.Sequence for e in ev] == [1, 2, 3] and [e.Reject for e in ev] == [False, True, True]
        assert [e.VerdictCode for e in ev] == [1, 2, 3] and [e.ResultId for e in ev] == ["cam1:0", "cam1:1", "cam1:2"]
        assert [e.PartId for e in ev] == ["P-0", "P-1", "P-2"]
        assert client.read("LastResult.Sequence") == 3 and client.read("LastResult.Verdict") == "error"
        assert client.read("LastResult.ErrorCode") == "bad_rgb" and client.read("LastResult.PartId") == "P-2"
        counters = [client.read(f"Counters.{n}") for n in ("Inspected", "Rejected", "Errors")]
        assert counters == [3, 2, 1]
        assert client.read("State") == "Ready"
        beat = client.read("Heartbeat")
        wait_for(lambda: client.read("Heartbeat") > beat, 3, "heartbeat")
        client.close()
        bridge.stop()
        # Restarted: the same last result and counters, and no second event for a result already announced.
        bridge = BridgeThread(s)
        client = OpcUaSubscriber(s.plc.opcua_server.endpoint, s.plc.opcua_server.namespace_uri, s.line).connect()
        assert client.read("LastResult.Sequence") == 3 and client.read("LastResult.ResultId") == "cam1:2"
        assert [client.read(f"Counters.{n}") for n in ("Inspected", "Rejected", "Errors")] == [3, 2, 1]
        publish(r, s, "anomalous", 3)
        wait_for(lambda: len(client.events) >= 1, 10, "event after restart")
        time.sleep(0.2)
        assert [e.Sequence for e in client.events] == [4]
    finally:
        client.close()
        bridge.stop()


def test_opcua_server_require_ack_holds_the_xack_and_a_restart_does_not_announce_twice(settings, cleanup, r):
    port = free_port()
    s = _with_plc(settings, protocol="opcua-server", drain_timeout_s=0.3, opcua_server={
        "endpoint": f"opc.tcp://127.0.0.1:{port}/crd-inspect/", "require_ack": True})  # fmt: skip
    ns, endpoint = s.plc.opcua_server.namespace_uri, s.plc.opcua_server.endpoint
    bridge = BridgeThread(s)
    client = OpcUaSubscriber(endpoint, ns, s.line).connect()
    try:
        publish(r, s, "anomalous", 0)
        publish(r, s, "ok", 1)
        wait_for(lambda: len(client.events) == 1, 10, "first event")
        wait_for(lambda: bridge.bridge.status[s.line].alarm, 5, "alarm while unacknowledged")
        assert _pending(r, s) == 2 and client.read("State") == "Error"
        # Stopped while the client has not acknowledged: the result stays pending...
        client.close()
        bridge.stop()
        assert _pending(r, s) == 2
        # ...and the restarted bridge resumes it without announcing it a second time.
        bridge = BridgeThread(s)
        client = OpcUaSubscriber(endpoint, ns, s.line).connect()
        assert client.read("LastResult.Sequence") == 1 and client.read("LastResult.Reject") is True
        time.sleep(0.3)
        assert bridge.bridge.adapter.announced[s.line] == 0  # resumed, not announced again
        client.write_ack(1)
        wait_for(lambda: len(client.events) == 1, 10, "the next result's event after the ack")
        client.write_ack(2)
        wait_for(lambda: _pending(r, s) == 0 and not bridge.bridge.status[s.line].alarm, 10, "acknowledged")
        time.sleep(0.2)
        assert [e.Sequence for e in client.events] == [2] and bridge.bridge.adapter.announced[s.line] == 1
    finally:
        client.close()
        bridge.stop()


# ---- configuration -------------------------------------------------------------------------------
def test_the_bridge_never_uses_the_workers_group(settings):
    with pytest.raises(ValueError, match="workers' consumer group"):
        Settings(plc={"group": "inspectors"})
    bad = settings.model_copy(update={"plc": settings.plc.model_copy(update={"group": "inspectors"})})
    with pytest.raises(ValueError, match="workers' consumer group"):
        PlcBridge(bad)

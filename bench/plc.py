"""PLC benchmark: capture -> PLC-visible latency through the whole pipeline, for each bridge protocol.

    .venv/bin/python bench/plc.py [--frames 100] [--fps 10] [--stand-in-ms 5]

Per protocol, one run of: producer (paced at --fps, small synthetic frames) -> Redis -> a worker with a
labelled fixed-latency stand-in model (`StandInInspector`: queueing, not the model) -> results ->
`crd plc` (PlcBridge, default settings) -> a PLC stand-in on loopback (the test suite's):
- modbus: a pymodbus TCP server whose "PLC program" polls result valid every 5 ms, reads, acks;
- opcua-client: an asyncua server with the PLC's nodes, same program, handshake nodes configured;
- opcua-server: an asyncua client subscribed (20 ms publishing interval) to the bridge's ResultReady events.
"PLC-visible" is when that program read the result (or the event arrived). Everything runs on this
machine in one process (threads); absolute numbers are for this machine only. Uses REDIS_URL, else an
embedded Valkey. Writes BENCHMARKS.md (section "plc") and bench/results/plc.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, machine, write_section
from consumers.plc.bridge import PlcBridge
from consumers.plc.ledger import ledger_key
from crd_model.stream import unpack_result
from crd_model.stream.embedded import redis_server_url
from crd_model.stream.redis_streams import F_PAYLOAD, connect
from crd_model.stream.settings import PlcSettings, Settings
from producers.producer import Producer
from producers.sources import SourceFrame
from tests.plc_sims import ModbusPlc, OpcUaPlc, OpcUaSubscriber, free_port, wait_for
from workers.models import ModelRegistry, StandInInspector
from workers.worker import Worker

PROTOCOLS = ("modbus", "opcua-client", "opcua-server")
HEADER = (
    "| protocol | results at the PLC | capture -> PLC p50 (ms) | p99 (ms) | result published -> PLC p50 (ms) "
    "| p99 (ms) | capture -> result p50 (ms) |\n|---|---|---|---|---|---|---|"
)


def _frames(n: int, seed: int = 0) -> list[SourceFrame]:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
    xyz = np.zeros((128, 128, 3), np.float32)
    xyz[..., 2] = 0.6
    return [SourceFrame(rgb, xyz, "disc", {"part_id": f"P{i}"}) for i in range(n)]


def run_protocol(url: str, protocol: str, n: int, fps: float, stand_in_ms: float) -> dict:
    line = f"benchplc{uuid.uuid4().hex[:8]}"
    s = Settings(line=line)
    s = s.model_copy(update={"redis": s.redis.model_copy(update={"url": url})})
    r = connect(s.redis)
    port = free_port()
    plc = subscriber = None
    if protocol == "modbus":
        p = PlcSettings(protocol="modbus", modbus={"port": port})
        plc = ModbusPlc([line], p.modbus).start()
    elif protocol == "opcua-client":
        plc = OpcUaPlc([line], port).start()
        nodes = {k: f"ns=2;s=Vision.{{line}}.{v}" for k, v in (("result_valid", "ResultValid"),
                                                                ("result_ack", "ResultAck"))}  # fmt: skip
        p = PlcSettings(protocol="opcua-client", opcua_client={"endpoint": plc.endpoint, "nodes": nodes})
    else:
        p = PlcSettings(protocol="opcua-server", opcua_server={"endpoint": f"opc.tcp://127.0.0.1:{port}/crd/"})
    s = s.model_copy(update={
        "plc": p,
        "producer": s.producer.model_copy(update={"fps": fps}),
        "worker": s.worker.model_copy(update={"max_wait_ms": 0, "block_ms": 100}),
    })  # fmt: skip
    bridge = PlcBridge(s)
    bt = threading.Thread(target=bridge.run, daemon=True)
    bt.start()
    wait_for(lambda: bridge.health.ready, 30, "bridge ready")
    if protocol == "opcua-server":
        subscriber = OpcUaSubscriber(p.opcua_server.endpoint, p.opcua_server.namespace_uri, line).connect()
    worker = Worker(s, ModelRegistry({"disc": StandInInspector(stand_in_ms)}), r=r)
    wt = threading.Thread(target=worker.run, kwargs={"max_frames": n, "idle_exit_s": 30}, daemon=True)
    wt.start()
    Producer(s, camera="cam1", r=r).run(_frames(n))
    wt.join(timeout=120)
    if subscriber is not None:
        wait_for(lambda: len(subscriber.events) >= n, 60, "all events")
        seen = {e.PartId: t for e, t in zip(subscriber.events, subscriber.times, strict=True)}
    elif protocol == "modbus":
        wait_for(lambda: len(plc.seen) >= n, 60, "all results at the PLC")
        seen = {x.part_id: x.t for x in plc.seen}
    else:
        wait_for(lambda: len(plc.seen) >= n, 60, "all results at the PLC")
        seen = {x["PartId"]: x["t"] for x in plc.seen}
    results = [unpack_result(f[F_PAYLOAD]) for _, f in r.xrange(s.streams.key(line, "results"))]
    capture_to_plc, result_to_plc, capture_to_result = [], [], []
    for res in results:
        t = seen.get(str(res.meta.get("part_id")))
        if t is None or res.timings.captured_at is None or res.timings.finished_at is None:
            continue
        capture_to_plc.append((t - res.timings.captured_at) * 1000)
        result_to_plc.append((t - res.timings.finished_at) * 1000)
        capture_to_result.append((res.timings.finished_at - res.timings.captured_at) * 1000)
    if subscriber is not None:
        subscriber.close()
    bridge.stop()
    bt.join(timeout=30)
    if plc is not None:
        plc.close()
    r.delete(*(s.streams.key(line, k) for k in ("frames", "results", "dead")), ledger_key(s.streams, line, p.group))

    def pct(v: list[float], q: float) -> float:
        return float(np.percentile(v, q)) if v else float("nan")

    return {
        "protocol": protocol, "frames": n, "delivered": len(capture_to_plc),
        "capture_to_plc_p50_ms": pct(capture_to_plc, 50), "capture_to_plc_p99_ms": pct(capture_to_plc, 99),
        "result_to_plc_p50_ms": pct(result_to_plc, 50), "result_to_plc_p99_ms": pct(result_to_plc, 99),
        "capture_to_result_p50_ms": pct(capture_to_result, 50),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--stand-in-ms", type=float, default=5.0)
    ap.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    from crd_model.stream.logs import configure_logging

    configure_logging(level="WARNING")
    logging.getLogger("asyncua").setLevel(logging.ERROR)  # the stand-ins' own servers warn about security
    rows = []
    with redis_server_url() as url:
        info = connect(Settings(redis={"url": url}).redis).info("server")
        server = (
            f"{'Valkey' if 'valkey_version' in info else 'Redis'} {info.get('valkey_version', info['redis_version'])}"
        )
        for protocol in a.protocols:
            row = run_protocol(url, protocol, a.frames, a.fps, a.stand_in_ms)
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = {"machine": machine(), "redis": server, "args": vars(a), "rows": rows}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    if a.no_write:
        return
    (ROOT / "bench" / "results" / "plc.json").write_text(json.dumps(out, indent=2) + "\n")
    table = "\n".join(
        f"| {x['protocol']} | {x['delivered']}/{x['frames']} | {x['capture_to_plc_p50_ms']:.1f} | "
        f"{x['capture_to_plc_p99_ms']:.1f} | {x['result_to_plc_p50_ms']:.1f} | {x['result_to_plc_p99_ms']:.1f} | "
        f"{x['capture_to_result_p50_ms']:.1f} |"
        for x in rows
    )
    write_section(
        "plc",
        f"""## PLC bridge latency (`bench/plc.py`)

Command: `.venv/bin/python bench/plc.py --frames {a.frames} --fps {a.fps:g} --stand-in-ms {a.stand_in_ms:g}`.
Machine: {out["machine"]}. One process: producer (128 x 128 synthetic frames at {a.fps:g} fps) -> Redis ->
worker with a labelled {a.stand_in_ms:g} ms stand-in model (not the CRD model: this measures the plumbing) ->
results -> `PlcBridge` (default settings) -> a PLC stand-in on loopback. "PLC-visible" is when the stand-in's
PLC program read the result (Modbus and OPC UA client: it polls result valid every 5 ms, then acks; OPC UA
server: a client's ResultReady event, 20 ms publishing interval). Redis: {server}. p50/p99 over the
results of one run per protocol.

{HEADER}
{table}
""",
    )


if __name__ == "__main__":
    main()

"""OPC UA server side (asyncua): the inspection system as a vision system in the style of OPC 40100-1.

Address space (namespace `plc.opcua_server.namespace_uri`, string node ids shown):

    Objects/CrdInspect                      s=CrdInspect          Heartbeat (UInt32)
      <line>                                s=<line>              emits ResultReadyEventType
        State, Alarm, AlarmReason, Heartbeat, Acknowledge (client-writable, require_ack mode)
        Counters/ Inspected Rejected Errors MissingResults          s=<line>.Counters.<name>
        LastResult/ ResultId Sequence PartId Camera CaptureSequence ProductId Verdict VerdictCode
                    Reject Score Threshold ModelId ErrorCode CaptureTime CreationTime Meta
                                                                   s=<line>.LastResult.<name>

As in the Machine Vision companion specification, a result has a ResultId (here the frame id), the ids
the part carries (PartId and the frame's whole meta as JSON), the recipe (ProductId = category), a
ResultState-like code (VerdictCode) and its times, and every new result is announced by an event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime

from asyncua import Node, Server, ua
from asyncua.crypto.permission_rules import User, UserRole

from consumers.plc.adapter import LineStatus, PlcAdapter, PlcUnavailable
from consumers.plc.records import PlcResult
from crd_model.stream.settings import OpcUaServerSettings

logging.getLogger("asyncua").setLevel(logging.ERROR)

V = ua.VariantType
LAST_RESULT = {
    "ResultId": V.String, "Sequence": V.UInt32, "PartId": V.String, "Camera": V.String,
    "CaptureSequence": V.UInt64, "ProductId": V.String, "Verdict": V.String, "VerdictCode": V.Int32,
    "Reject": V.Boolean, "Score": V.Double, "Threshold": V.Double, "ModelId": V.String, "ErrorCode": V.String,
    "CaptureTime": V.DateTime, "CreationTime": V.DateTime, "Meta": V.String,
}  # fmt: skip
COUNTERS = {"Inspected": "inspected", "Rejected": "rejected", "Errors": "errors", "MissingResults": "missing"}
EVENT_FIELDS = [
    ("ResultId", V.String), ("Sequence", V.UInt32), ("Line", V.String), ("PartId", V.String),
    ("Verdict", V.String), ("VerdictCode", V.Int32), ("Reject", V.Boolean), ("Score", V.Double),
    ("Threshold", V.Double), ("ModelId", V.String),
]  # fmt: skip
POLICIES = {
    "None": ua.SecurityPolicyType.NoSecurity,
    "Basic256Sha256_Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
    "Basic256Sha256_SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
}


def _time(t: float | None) -> datetime:
    return datetime.fromtimestamp(t or 0.0, UTC)


class _PasswordUsers:
    """One configured user; anonymous and other logins are refused."""

    def __init__(self, username: str, password: str):
        self.username, self.password = username, password

    def get_user(self, iserver, username=None, password=None, certificate=None) -> User | None:
        import hmac

        if username == self.username and password is not None and hmac.compare_digest(password, self.password):
            return User(role=UserRole.User, name=username)
        return None


class OpcUaServerAdapter(PlcAdapter):
    name = "opcua-server"

    def __init__(self, lines: list[str], cfg: OpcUaServerSettings):
        super().__init__(lines)
        self.cfg = cfg
        self.server: Server | None = None
        self.idx = 0
        self.vars: dict[str, dict[str, Node]] = {}
        self.events: dict[str, object] = {}
        self.published: dict[str, int] = dict.fromkeys(lines, 0)
        self.announced: dict[str, int] = dict.fromkeys(lines, 0)  # ResultReady events fired since start
        self.counters: dict[str, dict[str, int]] = {line: {} for line in lines}
        self.system_heartbeat: Node | None = None

    async def start(self) -> None:
        users = None
        if self.cfg.username is not None and self.cfg.password is not None:
            users = _PasswordUsers(self.cfg.username, self.cfg.password.get_secret_value())
        server = Server(user_manager=users)
        await server.init()
        server.set_endpoint(self.cfg.endpoint)
        server.set_server_name("crd-inspect PLC bridge")
        server.allow_remote_admin(False)
        server.set_security_policy([POLICIES[p] for p in self.cfg.security_policies])
        if users is not None:
            server.set_identity_tokens([ua.UserNameIdentityToken])
        if self.cfg.certificate_file and self.cfg.private_key_file:
            await server.load_certificate(str(self.cfg.certificate_file))
            await server.load_private_key(str(self.cfg.private_key_file))
        self.idx = idx = await server.register_namespace(self.cfg.namespace_uri)
        event_type = await server.create_custom_event_type(idx, "ResultReadyEventType", ua.ObjectIds.BaseEventType,
                                                           EVENT_FIELDS)  # fmt: skip
        system = await server.get_objects_node().add_object(ua.NodeId("CrdInspect", idx), f"{idx}:CrdInspect")
        self.system_heartbeat = await system.add_variable(
            ua.NodeId("CrdInspect.Heartbeat", idx), f"{idx}:Heartbeat", ua.Variant(0, V.UInt32)
        )
        for line in self.lines:
            obj = await system.add_object(ua.NodeId(line, idx), f"{idx}:{line}")
            await obj.write_attribute(
                ua.AttributeIds.EventNotifier, ua.DataValue(ua.Variant(1, V.Byte))
            )  # SubscribeToEvents
            nodes: dict[str, Node] = {}
            for name, vtype, default in (
                ("State", V.String, "Ready"), ("Alarm", V.Boolean, False), ("AlarmReason", V.String, ""),
                ("Heartbeat", V.UInt32, 0), ("Acknowledge", V.UInt32, 0),
            ):  # fmt: skip
                nodes[name] = await obj.add_variable(ua.NodeId(f"{line}.{name}", idx), f"{idx}:{name}",
                                                     ua.Variant(default, vtype))  # fmt: skip
            await nodes["Acknowledge"].set_writable()
            counters = await obj.add_folder(ua.NodeId(f"{line}.Counters", idx), f"{idx}:Counters")
            for name in COUNTERS:
                nodes[f"Counters.{name}"] = await counters.add_variable(
                    ua.NodeId(f"{line}.Counters.{name}", idx), f"{idx}:{name}", ua.Variant(0, V.UInt64)
                )
            last = await obj.add_object(ua.NodeId(f"{line}.LastResult", idx), f"{idx}:LastResult")
            for name, vtype in LAST_RESULT.items():
                nodes[f"LastResult.{name}"] = await last.add_variable(
                    ua.NodeId(f"{line}.LastResult.{name}", idx), f"{idx}:{name}",
                    ua.Variant(_time(0) if vtype == V.DateTime else ua.get_default_value(vtype), vtype),
                )  # fmt: skip
            self.vars[line] = nodes
            self.events[line] = await server.get_event_generator(event_type, obj)
        try:
            await server.start()
        except OSError as exc:
            raise PlcUnavailable(f"opcua server cannot listen on {self.cfg.endpoint}: {exc}") from exc
        self.server = server

    async def stop(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            await server.stop()

    async def reconnect(self) -> None:
        """Start serving once; a running server is never restarted (clients reconnect to it)."""
        if self.server is None:
            await self.start()

    async def _set(self, line: str, name: str, value: object, vtype: ua.VariantType) -> None:
        await self.vars[line][name].write_value(ua.Variant(value, vtype))

    async def _publish_fields(self, rec: PlcResult) -> None:
        values = {
            "ResultId": rec.frame_id, "Sequence": rec.sequence % 2**32, "PartId": rec.part_id, "Camera": rec.camera,
            "CaptureSequence": rec.capture_seq or 0, "ProductId": rec.category, "Verdict": rec.verdict,
            "VerdictCode": rec.verdict_code, "Reject": rec.reject,
            "Score": rec.score if rec.score is not None else float("nan"),
            "Threshold": rec.threshold if rec.threshold is not None else float("nan"),
            "ModelId": rec.model_id or "", "ErrorCode": rec.error_code or "",
            "CaptureTime": _time(rec.captured_at), "CreationTime": _time(rec.finished_at),
            "Meta": json.dumps(rec.meta, sort_keys=True),
        }  # fmt: skip
        # Sequence last: a client watching it finds the other fields already in place.
        for name in [*(n for n in LAST_RESULT if n != "Sequence"), "Sequence"]:
            await self._set(rec.line, f"LastResult.{name}", values[name], LAST_RESULT[name])
        for name, key in COUNTERS.items():
            await self._set(rec.line, f"Counters.{name}", self.counters[rec.line].get(key, 0), V.UInt64)

    async def restore(self, line: str, counters: dict[str, int], last: PlcResult | None) -> None:
        """After a restart: the last result and counters as they were, without announcing it again."""
        self.counters[line] = counters
        if last is not None:
            await self._publish_fields(last)
            self.published[line] = last.sequence
        else:
            for name, key in COUNTERS.items():
                await self._set(line, f"Counters.{name}", counters.get(key, 0), V.UInt64)

    async def deliver(self, rec: PlcResult, stopping: asyncio.Event) -> bool:
        if self.server is None:
            raise PlcUnavailable("opcua server not running")
        if self.published[rec.line] != rec.sequence:
            await self._publish_fields(rec)
            gen = self.events[rec.line]
            ev = gen.event  # type: ignore[attr-defined]
            ev.ResultId, ev.Sequence, ev.Line, ev.PartId = rec.frame_id, rec.sequence % 2**32, rec.line, rec.part_id
            ev.Verdict, ev.VerdictCode, ev.Reject = rec.verdict, rec.verdict_code, rec.reject
            ev.Score = rec.score if rec.score is not None else float("nan")
            ev.Threshold = rec.threshold if rec.threshold is not None else float("nan")
            ev.ModelId = rec.model_id or ""
            ev.Severity = 500 if rec.reject else 100
            await gen.trigger(message=f"{rec.line} result {rec.sequence}: {rec.verdict}")  # type: ignore[attr-defined]
            self.published[rec.line] = rec.sequence
            self.announced[rec.line] += 1
        if not self.cfg.require_ack:
            return True
        ack = self.vars[rec.line]["Acknowledge"]
        while (await ack.read_value()) != rec.sequence % 2**32:
            if stopping.is_set():
                return False
            await asyncio.sleep(0.02)
        return True

    async def heartbeat(self, line: str, count: int) -> None:
        await self._set(line, "Heartbeat", count % 2**32, V.UInt32)
        if self.system_heartbeat is not None and line == self.lines[0]:
            await self.system_heartbeat.write_value(ua.Variant(count % 2**32, V.UInt32))

    async def set_status(self, line: str, status: LineStatus) -> None:
        await self._set(line, "State", "Ready" if status.ready and not status.alarm else "Error", V.String)
        await self._set(line, "Alarm", status.alarm, V.Boolean)
        await self._set(line, "AlarmReason", status.alarm_reason, V.String)
        await self._set(line, "Counters.MissingResults", status.missing_count, V.UInt64)

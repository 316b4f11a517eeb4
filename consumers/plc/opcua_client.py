"""OPC UA client side (asyncua): write each result into nodes of the PLC's own OPC UA server."""

from __future__ import annotations

import logging

from asyncua import Client, ua
from asyncua.ua.uaerrors import UaError

from consumers.plc.adapter import HandshakeAdapter, HandshakeState, LineStatus, PlcUnavailable, plc_request
from consumers.plc.records import PlcResult
from crd_model.stream.settings import OpcUaClientSettings

logging.getLogger("asyncua").setLevel(logging.ERROR)

_INTEGER = {
    ua.VariantType.SByte, ua.VariantType.Byte, ua.VariantType.Int16, ua.VariantType.UInt16, ua.VariantType.Int32,
    ua.VariantType.UInt32, ua.VariantType.Int64, ua.VariantType.UInt64,
}  # fmt: skip
_RANGES = {
    ua.VariantType.SByte: (-(2**7), 2**7 - 1), ua.VariantType.Byte: (0, 2**8 - 1),
    ua.VariantType.Int16: (-(2**15), 2**15 - 1), ua.VariantType.UInt16: (0, 2**16 - 1),
    ua.VariantType.Int32: (-(2**31), 2**31 - 1), ua.VariantType.UInt32: (0, 2**32 - 1),
    ua.VariantType.Int64: (-(2**63), 2**63 - 1), ua.VariantType.UInt64: (0, 2**64 - 1),
}  # fmt: skip
_ERRORS = (OSError, TimeoutError, UaError, ConnectionError)


class OpcUaClientAdapter(HandshakeAdapter):
    name = "opcua-client"

    def __init__(self, lines: list[str], cfg: OpcUaClientSettings, score_scale: int):
        super().__init__(lines)
        self.cfg, self.nodes = cfg, cfg.nodes
        self.score_scale = cfg.score_scale or score_scale
        self.poll_s = cfg.poll_ms / 1000.0
        self.client: Client | None = None
        self._types: dict[str, ua.VariantType] = {}

    @property
    def handshake(self) -> bool:
        return bool(self.nodes.result_valid)

    def _id(self, template: str, line: str) -> str:
        return template.replace("{line}", line)

    async def start(self) -> None:
        client = Client(self.cfg.endpoint, timeout=self.cfg.timeout_s)
        if self.cfg.username:
            client.set_user(self.cfg.username)
        if self.cfg.password is not None:
            client.set_password(self.cfg.password.get_secret_value())
        try:
            if self.cfg.security_string is not None:
                await client.set_security_string(self.cfg.security_string.get_secret_value())
            await client.connect()
        except _ERRORS as exc:
            raise PlcUnavailable(f"opcua connect {self.cfg.endpoint}: {exc!r}") from exc
        self.client = client
        self._types.clear()

    async def stop(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            try:
                await client.disconnect()
            except Exception:  # the PLC is gone already: nothing to close politely
                client.uaclient.protocol = None

    async def _type(self, node_id: str) -> ua.VariantType:
        if node_id not in self._types:
            assert self.client is not None
            self._types[node_id] = await self.client.get_node(node_id).read_data_type_as_variant_type()
        return self._types[node_id]

    async def _variant(self, node_id: str, value: object, scale: int = 1) -> ua.Variant:
        vtype = await self._type(node_id)
        if vtype == ua.VariantType.Boolean:
            value = bool(value)
        elif vtype in _INTEGER:
            number = round(float(value) * scale) if isinstance(value, float) else int(value)  # type: ignore[arg-type]
            lo, hi = _RANGES[vtype]
            value = min(hi, max(lo, number))
        elif vtype in (ua.VariantType.Float, ua.VariantType.Double):
            value = float(value)  # type: ignore[arg-type]
        elif vtype == ua.VariantType.String:
            value = str(value)
        return ua.Variant(value, vtype)

    async def _write(self, line: str, values: list[tuple[str, object, int]]) -> None:
        """Write (node template, value, scale) in one request; every status must be Good."""
        if self.client is None:
            raise PlcUnavailable("opcua: not connected")
        with plc_request("opcua write", _ERRORS):
            node_ids = [self._id(t, line) for t, _, _ in values if t]
            variants = [await self._variant(self._id(t, line), v, s) for t, v, s in values if t]
            nodes = [self.client.get_node(n) for n in node_ids]
            await self.client.write_values(nodes, [ua.DataValue(v) for v in variants])

    async def _read(self, line: str, templates: list[str]) -> list[object]:
        if self.client is None:
            raise PlcUnavailable("opcua: not connected")
        with plc_request("opcua read", _ERRORS):
            values = await self.client.read_values([self.client.get_node(self._id(t, line)) for t in templates])
        return values

    async def read_state(self, line: str) -> HandshakeState:
        n = self.nodes
        if not self.handshake:
            (sequence,) = await self._read(line, [n.sequence])
            return HandshakeState(int(sequence or 0))
        sequence, valid, ack = await self._read(line, [n.sequence, n.result_valid, n.result_ack])
        return HandshakeState(int(sequence or 0), bool(valid), bool(ack))

    async def write_result(self, rec: PlcResult) -> None:
        n = self.nodes
        await self._write(
            rec.line,
            [
                (n.verdict_code, rec.verdict_code, 1),
                (n.reject, rec.reject, 1),
                (n.score, 0.0 if rec.score is None else rec.score, self.score_scale),
                (n.part_id, rec.part_id, 1),
                (n.frame_id, rec.frame_id, 1),
            ],
        )
        # The sequence last, in its own request: a PLC that triggers on it finds the fields in place.
        await self._write(rec.line, [(n.sequence, rec.sequence, 1)])

    async def set_valid(self, line: str) -> None:
        await self._write(line, [(self.nodes.result_valid, True, 1)])

    async def clear(self, line: str) -> None:
        n = self.nodes
        await self._write(line, [(n.result_valid, False, 1), (n.reject, False, 1), (n.result_ack, False, 1)])

    async def heartbeat(self, line: str, count: int) -> None:
        if self.nodes.heartbeat:
            vtype = await self._type(self._id(self.nodes.heartbeat, line))
            value = count % 2 == 1 if vtype == ua.VariantType.Boolean else count % 2**31  # a toggling bit or a counter
            await self._write(line, [(self.nodes.heartbeat, value, 1)])

    async def set_status(self, line: str, status: LineStatus) -> None:
        n = self.nodes
        await self._write(line, [(n.alarm, status.alarm, 1), (n.missing_count, status.missing_count, 1)])

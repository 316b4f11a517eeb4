"""What every PLC protocol adapter offers the bridge, and the result-valid / result-ack handshake they share."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from consumers.plc.records import PlcResult


def raise_if_cancelling() -> None:
    """Hand on a cancellation that the PLC library swallowed. pymodbus and asyncua wait for each answer
    with asyncio.wait_for, which on Python 3.11 returns the answer (or raises a timeout) when the cancel
    lands as the answer arrives (CPython gh-86296); the bridge's shutdown would then wait on a task that
    carries on. Called after every request, answered or failed."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class PlcUnavailable(Exception):
    """The PLC cannot be reached (or refused a request): retry later, with the same record."""


@contextmanager
def plc_request(what: str, errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Around one request to the PLC library: its `errors` become PlcUnavailable("<what>: <error>"), and
    a cancellation the library swallowed is handed on whether the request was answered or failed."""
    try:
        yield
    except errors as exc:
        raise_if_cancelling()
        raise PlcUnavailable(f"{what}: {exc!r}") from exc
    raise_if_cancelling()


@dataclass
class LineStatus:
    """What the bridge reports about a line besides results."""

    ready: bool = True
    alarm: bool = False
    alarm_reason: str = ""
    missing_count: int = 0
    missing_capture_seq: int = 0


@dataclass
class HandshakeState:
    """The PLC-side copy of the last result sequence written, and the two handshake bits."""

    sequence: int
    valid: bool = False
    ack: bool = False


class PlcAdapter(abc.ABC):
    """One PLC connection serving all lines of the bridge."""

    name = "plc"

    def __init__(self, lines: list[str]):
        self.lines = lines

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect (client modes) or start serving (server mode); raises PlcUnavailable."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Release the connection or stop the server."""

    async def reconnect(self) -> None:
        await self.stop()
        await self.start()

    async def restore(self, line: str, counters: dict[str, int], last: PlcResult | None) -> None:  # noqa: B027
        """At start: what the ledger remembers (only a server, which loses its address space, needs it)."""

    @abc.abstractmethod
    async def deliver(self, rec: PlcResult, stopping: asyncio.Event) -> bool:
        """Put `rec` in front of the PLC and return once the PLC confirmed it (True), or False if
        `stopping` was set while waiting for the PLC (the record stays unconfirmed). Idempotent: a
        record whose sequence the PLC already has is not written (or pulsed) again."""

    @abc.abstractmethod
    async def heartbeat(self, line: str, count: int) -> None:
        """Tell the PLC the inspection system is alive."""

    @abc.abstractmethod
    async def set_status(self, line: str, status: LineStatus) -> None:
        """Ready / alarm / missing results, as the protocol can show them."""


class HandshakeAdapter(PlcAdapter):
    """Adapters that write into the PLC (Modbus, OPC UA client): write, then result valid / result ack.

    Order of one delivery: read the PLC's state; if it already holds this sequence, resume where the
    previous bridge left off (no rewrite). Otherwise write the result (sequence, verdict, reject, ...),
    then set result valid; wait for the PLC's result ack; clear result valid, reject and ack. Without a
    handshake, a result is confirmed when the PLC acknowledged the write.
    """

    poll_s = 0.02

    @property
    @abc.abstractmethod
    def handshake(self) -> bool: ...

    @abc.abstractmethod
    async def read_state(self, line: str) -> HandshakeState: ...

    @abc.abstractmethod
    async def write_result(self, rec: PlcResult) -> None:
        """Every result field, the sequence and the reject bit; not result valid."""

    @abc.abstractmethod
    async def set_valid(self, line: str) -> None: ...

    @abc.abstractmethod
    async def clear(self, line: str) -> None:
        """Result valid, reject and result ack back to 0 (the reject pulse ends here)."""

    async def deliver(self, rec: PlcResult, stopping: asyncio.Event) -> bool:
        st = await self.read_state(rec.line)
        if st.sequence != rec.sequence % 2**32:
            if self.handshake and (st.valid or st.ack):
                await self.clear(rec.line)  # leftovers of an earlier result (e.g. the PLC restarted mid-way)
            await self.write_result(rec)
            if not self.handshake:
                return True
            await self.set_valid(rec.line)
        elif not self.handshake or not (st.valid or st.ack):
            return True  # the PLC had it already and the handshake (if any) had completed
        while True:  # the PLC has the result, valid is set: wait for its ack (the bridge raises the alarm)
            st = await self.read_state(rec.line)
            if st.ack:
                break
            if stopping.is_set():
                return False
            await asyncio.sleep(self.poll_s)
        await self.clear(rec.line)
        return True

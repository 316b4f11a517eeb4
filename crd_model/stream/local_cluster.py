"""A throwaway Redis Cluster of local `redis-server` processes, for the tests and the benchmarks.

    with LocalCluster(tmp_path, acl_file=Path("deploy/redis/users.acl"), admin=("crd-admin", "pw")) as cluster:
        cluster.url                      # redis://127.0.0.1:<port>/0 of the first node
        cluster.owner(slot)              # the node that serves a slot
        cluster.reshard(slot, to=node)   # `redis-cli --cluster reshard`, as an operator would

Real server and `redis-cli` binaries from the PATH (Debian: `apt-get install redis-server`), on
free loopback ports, data in a temporary folder; created with `redis-cli --cluster create`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

import redis
from redis.crc import key_slot


def cluster_binaries() -> tuple[str, str] | None:
    """(server, cli) from the PATH: Redis, else Valkey; None if neither is installed."""
    for server, cli in (("redis-server", "redis-cli"), ("valkey-server", "valkey-cli")):
        server_path, cli_path = shutil.which(server), shutil.which(cli)
        if server_path and cli_path:
            return server_path, cli_path
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slot_of(line: str) -> int:
    """The cluster slot of a line's streams: the hash tag `{line}` decides it (StreamSettings.key)."""
    return key_slot(f"{{{line}}}".encode())


def line_in_slot(slot: int, stem: str) -> str:
    """A line name `<stem>-<n>` whose streams hash to `slot` (a few thousand tries at most)."""
    n = 0
    while slot_of(f"{stem}-{n}") != slot:
        n += 1
    return f"{stem}-{n}"


class TlsFiles(NamedTuple):
    """PEM files of a TLS cluster: the CA, the nodes' server certificate, and a client certificate
    (extended key usage clientAuth) that nodes present to each other on the cluster bus."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path


@dataclass
class Node:
    port: int
    bus_port: int
    workdir: Path
    process: subprocess.Popen | None = None
    node_id: str = ""
    slots: set[int] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class LocalCluster:
    """`masters` primaries, no replicas, all slots covered; optionally with an ACL file, optionally TLS only.

    `tls`: every node serves TLS only (`port 0`), the cluster bus and MIGRATE too; the server
    certificate must name 127.0.0.1 (the address the nodes announce).
    """

    def __init__(
        self,
        root: Path,
        masters: int = 3,
        acl_file: Path | None = None,
        admin: tuple[str, str] | None = None,
        node_timeout_ms: int = 5000,
        tls: TlsFiles | None = None,
    ):
        found = cluster_binaries()
        if found is None:
            raise FileNotFoundError("no redis-server + redis-cli on the PATH (Debian: apt-get install redis-server)")
        self.server_bin, self.cli_bin = found
        self.root = Path(root)
        self.acl_file = acl_file
        self.admin = admin  # (user, password) for the tooling when the ACL file disables `default`
        self.node_timeout_ms = node_timeout_ms
        self.tls = tls
        self.nodes = [Node(_free_port(), _free_port(), self.root / f"node{i}") for i in range(masters)]
        self._clients: dict[int, redis.Redis] = {}  # admin connections by port, kept across polls

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        for node in self.nodes:
            node.workdir.mkdir(parents=True, exist_ok=True)
            conf = [
                *(["port 0", f"tls-port {node.port}"] if self.tls else [f"port {node.port}"]),
                f"cluster-port {node.bus_port}",
                "bind 127.0.0.1",
                "cluster-enabled yes",
                "cluster-config-file nodes.conf",
                f"cluster-node-timeout {self.node_timeout_ms}",
                f"dir {node.workdir}",
                'save ""',
                "appendonly no",
                "maxmemory-policy noeviction",
            ]
            if self.acl_file is not None:
                conf.append(f"aclfile {Path(self.acl_file).resolve()}")
            if self.tls is not None:
                t = self.tls
                conf += [f"tls-ca-cert-file {t.ca}", f"tls-cert-file {t.cert}", f"tls-key-file {t.key}"]
                # The cluster bus always asks its peers for a certificate, one allowed for client use.
                conf += [f"tls-client-cert-file {t.client_cert}", f"tls-client-key-file {t.client_key}"]
                conf += ["tls-cluster yes", "tls-replication yes", "tls-auth-clients no"]
            (node.workdir / "redis.conf").write_text("\n".join(conf) + "\n")
            with open(node.workdir / "server.log", "wb") as log:
                node.process = subprocess.Popen(
                    [self.server_bin, str(node.workdir / "redis.conf")],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=node.workdir,
                )
        for node in self.nodes:
            self._wait(lambda n=node: self._pings(n), 10, f"redis-server on port {node.port}", node)
        self.cli("--cluster", "create", *[n.address for n in self.nodes], "--cluster-replicas", "0", "--cluster-yes")
        self._wait(self._settled, 20, "cluster_state:ok on every node")
        self.refresh()

    def stop(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.kill()
                node.process.wait(timeout=10)

    # -- access ----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{self.nodes[0].address}/0"

    def client(self, node: Node) -> redis.Redis:
        """A plain (single-node) admin connection to one node (one client per node, reused: the waits
        poll every 50 ms)."""
        if node.port not in self._clients:
            user, password = self.admin or (None, None)
            tls = {"ssl": True, "ssl_ca_certs": str(self.tls.ca)} if self.tls else {}
            self._clients[node.port] = redis.Redis(
                "127.0.0.1", node.port, username=user, password=password, socket_timeout=30, **tls
            )
        return self._clients[node.port]

    def cli(self, *args: str, timeout_s: float = 60) -> str:
        """Run redis-cli (as the admin user, if any) against the first node; its output, or an error."""
        auth = ["--user", self.admin[0], "--pass", self.admin[1], "--no-auth-warning"] if self.admin else []
        tls = ["--tls", "--cacert", str(self.tls.ca)] if self.tls else []
        argv = [self.cli_bin, *auth, *tls, *args]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        if out.returncode != 0 or "[ERR]" in out.stdout:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}")
        return out.stdout

    def refresh(self) -> None:
        """Re-read node ids and slot ownership (after a reshard)."""
        for node in self.nodes:
            node.node_id = self.client(node).execute_command("CLUSTER", "MYID").decode()
            node.slots = set()
        by_id = {n.node_id: n for n in self.nodes}
        for line in self.client(self.nodes[0]).execute_command("CLUSTER", "NODES").decode().splitlines():
            words = line.split()
            for rng in words[8:]:
                if rng.startswith("["):
                    continue  # a slot in migration, listed again under its owner
                lo, _, hi = rng.partition("-")
                by_id[words[0]].slots.update(range(int(lo), int(hi or lo) + 1))

    def owner(self, slot: int) -> Node | None:
        """The node that serves `slot` now (None in the instant no node lists it)."""
        self.refresh()
        return next((n for n in self.nodes if slot in n.slots), None)

    # -- moving slots ----------------------------------------------------------------------------
    def reshard(self, slot: int, to: Node) -> None:
        """Move `slot` with `redis-cli --cluster reshard`, as an operator would.

        redis-cli moves a source's lowest-numbered slots first, so `slot` must be its owner's lowest.
        """
        source = self.owner(slot)
        if slot != min(source.slots):
            raise ValueError(f"redis-cli reshard would move slot {min(source.slots)}, not {slot}")
        self.cli(
            "--cluster",
            "reshard",
            source.address,
            "--cluster-from",
            source.node_id,
            "--cluster-to",
            to.node_id,
            "--cluster-slots",
            "1",
            "--cluster-yes",
        )
        self._wait(lambda: self.owner(slot) is to, 10, f"slot {slot} on port {to.port}")
        self._wait(self._settled, 20, "cluster_state:ok after the reshard")

    def move_slot_key_by_key(self, slot: int, to: Node, pause_s: float) -> None:
        """Move `slot` by hand (CLUSTER SETSLOT + MIGRATE), one key at a time with a pause between.

        Between two keys the slot is split: some of its keys are on the target already, some not.
        A command on several keys of the slot gets TRYAGAIN for that long, which is what a worker
        must ride out. Tools that batch keys (redis-cli) only make that window shorter.
        """
        source = self.begin_migration(slot, to)
        while keys := self.client(source).execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1):
            self.migrate(source, to, [k.decode() for k in keys])
            time.sleep(pause_s)
        self.finish_migration(slot, to)

    def begin_migration(self, slot: int, to: Node) -> Node:
        """Mark `slot` as importing on `to` and migrating on its owner; returns the owner."""
        source = self.owner(slot)
        self.client(to).execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        self.client(source).execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", to.node_id)
        return source

    def migrate(self, source: Node, to: Node, keys: list[str]) -> None:
        auth = ["AUTH2", *self.admin] if self.admin else []
        self.client(source).execute_command("MIGRATE", "127.0.0.1", to.port, "", 0, 60_000, *auth, "KEYS", *keys)

    def finish_migration(self, slot: int, to: Node) -> None:
        """Hand `slot` to `to` on every node: the new owner first, so the slot always has one."""
        source = self.owner(slot)
        for node in [to, source, *[n for n in self.nodes if n not in (to, source)]]:
            self.client(node).execute_command("CLUSTER", "SETSLOT", slot, "NODE", to.node_id)
        self._wait(lambda: self.owner(slot) is to, 10, f"slot {slot} on port {to.port}")

    # -- waiting ---------------------------------------------------------------------------------
    def _pings(self, node: Node) -> bool:
        try:
            return bool(self.client(node).ping())
        except redis.ConnectionError:
            return False

    def _settled(self) -> bool:
        """Every node says ok and they agree on who serves which slot."""
        try:
            views = []
            for node in self.nodes:
                c = self.client(node)
                if b"cluster_state:ok" not in c.execute_command("CLUSTER", "INFO"):
                    return False
                views.append(sorted((s[0], s[1], s[2][1]) for s in c.execute_command("CLUSTER", "SLOTS")))
            return all(v == views[0] for v in views)
        except redis.ConnectionError:
            return False

    def _wait(self, ok, timeout_s: float, what: str, node: Node | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while not ok():
            for n in [node] if node else self.nodes:
                if n.process is not None and n.process.poll() is not None:
                    log = (n.workdir / "server.log").read_text()[-2000:]
                    raise RuntimeError(f"redis-server on port {n.port} exited:\n{log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.05)

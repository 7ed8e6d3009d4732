"""A redis-server of a test's own, on a free port, to kill, stop and restart at will."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from tests.ports import free_port


def wait_ping(port: int, timeout: float = 15) -> None:
    client = redis.Redis(port=port, socket_connect_timeout=1)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except (redis.ConnectionError, redis.exceptions.BusyLoadingError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        client.close()


class PrivateRedis:
    """``redis-server`` bound to 127.0.0.1; no RDB snapshots; AOF (fsync always) only if asked."""

    def __init__(self, directory: Path, aof: bool = False, extra_args: Sequence[str] = ()) -> None:
        self.port = free_port()
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if aof else ["--appendonly", "no"]
        self.args = [
            "redis-server",
            *("--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(directory)),
            *persistence,
            *extra_args,
        ]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL)
        wait_ping(self.port)

    def kill(self) -> None:
        """``kill -9``: the server vanishes mid-whatever."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


class PrivateSentinels:
    """A primary, one replica and ``count`` sentinels (``redis-server --sentinel``) monitoring
    them as ``name``, each on its own free port, with timings shortened for tests."""

    def __init__(self, directory: Path, count: int = 1, name: str = "mymaster") -> None:
        self.name = name
        self.directory = directory
        fast = ["--repl-diskless-sync-delay", "0"]  # a replica syncs at once, not after 5 s
        for sub in ("a", "b"):  # a replica writes the synced dump.rdb to its --dir
            (directory / sub).mkdir(exist_ok=True)
        self.primary = PrivateRedis(directory / "a", extra_args=fast)
        replica_of = ["--replicaof", "127.0.0.1", str(self.primary.port)]
        self.replica = PrivateRedis(directory / "b", extra_args=[*fast, *replica_of])
        while self.replica.port == self.primary.port:  # nothing listens on either port yet
            self.replica = PrivateRedis(directory / "b", extra_args=[*fast, *replica_of])
        self.ports: list[int] = []
        while len(self.ports) < count:
            port = free_port()
            if port not in (self.primary.port, self.replica.port, *self.ports):
                self.ports.append(port)
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """``tq+sentinel://`` URL naming every sentinel (kombu's ``;``-separated form)."""
        return "tq+" + ";".join(f"sentinel://127.0.0.1:{port}" for port in self.ports) + "/0"

    def server(self, port: int) -> PrivateRedis:
        return self.primary if port == self.primary.port else self.replica

    def start(self) -> PrivateSentinels:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.primary.start()
        self.replica.start()
        self.wait_replicated(self.primary.port)
        for port in self.ports:
            conf = self.directory / f"sentinel-{port}.conf"  # a sentinel rewrites its config file
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"sentinel monitor {self.name} 127.0.0.1 {self.primary.port} {len(self.ports) // 2 + 1}\n"
                f"sentinel down-after-milliseconds {self.name} 1000\n"
                f"sentinel failover-timeout {self.name} 5000\n"
            )
            process = subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
            self.sentinels.append(process)
            wait_ping(port)
            if process.poll() is not None:
                raise RuntimeError(f"redis-server --sentinel on port {port} exited ({process.returncode})")
            with self.sentinel(port) as client:
                # Redis >= 7: faster polls, and a demoted primary that still says it is one is
                # reconfigured 4 x publish-period after the failover (8 s by default).
                client.execute_command(
                    "SENTINEL", "DEBUG", "info-period", 200, "publish-period", 250, "ping-period", 200
                )
        self.wait_primary(self.primary.port, with_replica=True)

    def sentinel(self, port: int | None = None) -> redis.Redis:
        return redis.Redis(port=port or self.ports[0], socket_timeout=5, decode_responses=True)

    def primary_port(self) -> int:
        with self.sentinel() as client:
            return int(client.sentinel_get_master_addr_by_name(self.name)[1])

    def wait_primary(self, port: int, with_replica: bool = False, timeout: float = 20) -> None:
        """Until every sentinel names ``port`` the primary (and sees a healthy replica to promote)
        and that server says it is one."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._role(port) == "master" and all(
                    self._settled(p, port, with_replica) for p in self.ports
                ):
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the sentinels did not settle on 127.0.0.1:{port} as {self.name}")
            time.sleep(0.05)

    def _settled(self, sentinel_port: int, port: int, with_replica: bool) -> bool:
        with self.sentinel(sentinel_port) as client:
            if int(client.sentinel_get_master_addr_by_name(self.name)[1]) != port:
                return False
            replicas = client.sentinel_slaves(self.name) if with_replica else [{}]
            return any(
                r.get("flags", "slave") == "slave" and r.get("master-link-status", "ok") == "ok"
                for r in replicas
            )

    @staticmethod
    def _role(port: int) -> str:
        with redis.Redis(port=port, socket_timeout=5, decode_responses=True) as client:
            return str(client.role()[0])

    @staticmethod
    def wait_replicated(port: int, timeout: float = 20) -> None:
        """Until the replica has every write the primary on ``port`` acknowledged (WAIT 1)."""
        deadline = time.monotonic() + timeout
        with redis.Redis(port=port, socket_timeout=5) as client:
            while int(client.execute_command("WAIT", 1, 500)) < 1:
                if time.monotonic() > deadline:
                    raise TimeoutError("the replica did not catch up")

    def failover(self, pause_writes: bool = True) -> int:
        """``SENTINEL FAILOVER``; returns the new primary's port once the old one is its replica.

        Sentinel promotes the replica without stopping the old primary, which accepts writes
        (lost when it becomes a replica) until it is reconfigured. ``pause_writes`` makes it a
        planned switchover: ``CLIENT PAUSE WRITE`` on the old primary until then.
        """
        old = self.primary_port()
        new = self.replica.port if old == self.primary.port else self.primary.port
        with redis.Redis(port=old, socket_timeout=5) as client:
            if pause_writes:
                client.execute_command("CLIENT", "PAUSE", 20000, "WRITE")
            with self.sentinel() as sentinel:
                sentinel.execute_command("SENTINEL", "FAILOVER", self.name)
            self.wait_primary(new)
            deadline = time.monotonic() + 20
            while self._role(old) != "slave":
                if time.monotonic() > deadline:
                    raise TimeoutError(f"127.0.0.1:{old} was not reconfigured as a replica")
                time.sleep(0.05)
            if pause_writes:
                client.execute_command("CLIENT", "UNPAUSE")
        return new

    def kill_primary(self) -> int:
        """``kill -9`` of the primary; returns the port of the replica the sentinels promote."""
        old = self.primary_port()
        self.server(old).kill()
        new = self.replica.port if old == self.primary.port else self.primary.port
        # A sentinel that aborts its first attempt (e.g. it has not yet seen the replica as
        # healthy on a loaded machine) tries again 2 x failover-timeout (10 s) later.
        self.wait_primary(new, timeout=60)
        return new

    def stop(self) -> None:
        for process in self.sentinels:
            if process.poll() is None:
                process.terminate()
                process.wait(10)
        self.replica.stop()
        self.primary.stop()

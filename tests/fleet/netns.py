"""A fleet of hosts on one machine: Linux network namespaces joined by a bridge.

:class:`Fleet` creates a "server" namespace and N host namespaces, each with one veth whose
other end is on a bridge in the root namespace (which gets no address on it). A forwarder
(:mod:`tests.fleet.forwarder`) listens in the server namespace and connects to the shared
servers on the root namespace's 127.0.0.1, so the hosts reach Redis, RabbitMQ and PostgreSQL
at ``fleet.server_ip`` and only there. Faults act on a host's link or processes:

* :meth:`Fleet.partition` / :meth:`Fleet.heal`: the host's veth (root side) down / up; packets
  are dropped silently, no RST, as when a switch port dies.
* :meth:`Fleet.kill_host`: kill -9 of every process in the host's namespace.

Names carry a random suffix; :meth:`Fleet.close` (also registered with atexit) removes the
namespaces, veths and bridge even when a test fails. Needs root and ``ip``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORWARDED_PORTS = (6379, 5672, 5432)


def can_run() -> str | None:
    """None when fleets can be built here, else the reason why not."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, as CI does)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"tqprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


class Fleet:
    """N host namespaces and a server namespace on one bridge; see the module docstring."""

    def __init__(self, hosts: int) -> None:
        self.suffix = uuid.uuid4().hex[:6]
        self.subnet = 1 + int(self.suffix[:2], 16) % 250
        self.bridge = f"tqb{self.suffix}"
        self.server_ns = f"tq{self.suffix}s"
        self.hosts = [f"tq{self.suffix}h{i}" for i in range(hosts)]
        self.server_ip = f"10.213.{self.subnet}.1"
        self.forwarder: subprocess.Popen[str] | None = None
        self._made: list[tuple[str, str]] = []  # ("netns"|"link", name), undone in reverse
        atexit.register(self.close)

    # -- building -----------------------------------------------------------------------------

    def start(self) -> Fleet:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self._made.append(("link", self.bridge))
            _ip("link", "set", self.bridge, "up")
            self._add_ns(self.server_ns, self.server_ip)
            for i, ns in enumerate(self.hosts):
                self._add_ns(ns, f"10.213.{self.subnet}.{10 + i}")
            self._start_forwarder()
        except BaseException:
            self.close()
            raise
        return self

    def _add_ns(self, ns: str, address: str) -> None:
        _ip("netns", "add", ns)
        self._made.append(("netns", ns))
        # The root-side end is named after the namespace; the host side becomes eth0.
        _ip("link", "add", ns, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self._made.append(("link", ns))
        _ip("link", "set", ns, "master", self.bridge)
        _ip("link", "set", ns, "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")

    def _start_forwarder(self) -> None:
        self.forwarder = subprocess.Popen(
            [sys.executable, "-m", "tests.fleet.forwarder", self.server_ns, self.server_ip]
            + [str(port) for port in FORWARDED_PORTS],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.forwarder.stdout is not None
        line = self.forwarder.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"fleet forwarder did not start (printed {line!r})")

    # -- using ----------------------------------------------------------------------------------

    def exec_prefix(self, host: int) -> list[str]:
        """The command prefix that runs a program inside host ``host``."""
        return ["ip", "netns", "exec", self.hosts[host]]

    def host_ip(self, host: int) -> str:
        return f"10.213.{self.subnet}.{10 + host}"

    # -- faults -----------------------------------------------------------------------------------

    def partition(self, host: int) -> None:
        """Cut ``host`` off: its link drops every packet, both ways, without telling anyone."""
        _ip("link", "set", self.hosts[host], "down")

    def heal(self, host: int) -> None:
        _ip("link", "set", self.hosts[host], "up")

    def pids(self, host: int) -> list[int]:
        out = _ip("netns", "pids", self.hosts[host], check=False).stdout
        return [int(p) for p in out.split()]

    def kill_host(self, host: int) -> int:
        """kill -9 every process of ``host``, until none is left; returns how many were killed."""
        killed: set[int] = set()
        deadline = time.monotonic() + 10
        while (pids := self.pids(host)) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            time.sleep(0.05)
        return len(killed)

    # -- tearing down -----------------------------------------------------------------------------

    def close(self) -> None:
        for i in range(len(self.hosts)):
            if ("netns", self.hosts[i]) in self._made:
                self.kill_host(i)
        if self.forwarder is not None:
            self.forwarder.kill()
            self.forwarder.wait(10)
            self.forwarder = None
        while self._made:
            kind, name = self._made.pop()
            if kind == "netns":
                _ip("netns", "del", name, check=False)
            else:
                _ip("link", "del", name, check=False)

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

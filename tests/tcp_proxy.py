"""A TCP proxy that breaks the links through it on a signal, for fault tests and benchmarks.

``python -c PROXY LISTEN_PORT TARGET_PORT [REFUSE_SECONDS]`` prints ``ready`` once it listens, then:

- SIGUSR1 freezes every link open now (half-open: no FIN, the bytes never arrive); new links work;
- SIGUSR2 drops every link (both sides get a FIN) and refuses connections for REFUSE_SECONDS (5).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from types import TracebackType

from tests.ports import free_port

__all__ = ["PROXY", "TcpProxy"]

PROXY = """
import signal, socket, sys, threading, time
listen, target = int(sys.argv[1]), int(sys.argv[2])
refuse_for = float(sys.argv[3]) if len(sys.argv) > 3 else 5.0
links = []  # (frozen, the link's two sockets)
refusing_until = [0.0]

def pipe(src, dst, frozen):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            if frozen.is_set():
                threading.Event().wait()  # half-open: the bytes never arrive
            dst.sendall(data)
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.close()
        except OSError:
            pass

def freeze(*_):
    for frozen, _socks in links:
        frozen.set()

def drop(*_):
    refusing_until[0] = time.monotonic() + refuse_for
    for _frozen, socks in links:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    links.clear()

signal.signal(signal.SIGUSR1, freeze)
signal.signal(signal.SIGUSR2, drop)
server = socket.create_server(("127.0.0.1", listen))
server.settimeout(0.05)
print("ready", flush=True)
while True:
    if time.monotonic() < refusing_until[0]:
        if server is not None:
            server.close()  # connecting now is refused
            server = None
        time.sleep(0.05)
        continue
    if server is None:
        server = socket.create_server(("127.0.0.1", listen))
        server.settimeout(0.05)
    try:
        client, _ = server.accept()
    except OSError:  # the accept timed out, or a drop closed the server meanwhile
        continue
    client.settimeout(None)
    try:
        upstream = socket.create_connection(("127.0.0.1", target))
    except OSError:
        client.close()
        continue
    frozen = threading.Event()
    links.append((frozen, (client, upstream)))
    threading.Thread(target=pipe, args=(client, upstream, frozen), daemon=True).start()
    threading.Thread(target=pipe, args=(upstream, client, frozen), daemon=True).start()
"""


class TcpProxy:
    """The proxy as a subprocess on a free port in front of ``127.0.0.1:target``."""

    def __init__(self, target: int, refuse_for: float = 5.0) -> None:
        self.target, self.refuse_for = target, refuse_for
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> TcpProxy:
        args = [sys.executable, "-c", PROXY, str(self.port), str(self.target), str(self.refuse_for)]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE)
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != b"ready":
            self.stop()
            raise RuntimeError(f"the TCP proxy on port {self.port} did not start")
        return self

    def freeze(self) -> None:
        """Every link open now hangs (no FIN); links opened later work."""
        assert self.process is not None
        self.process.send_signal(signal.SIGUSR1)

    def drop(self) -> None:
        """Every link is closed and connecting is refused for ``refuse_for`` seconds."""
        assert self.process is not None
        self.process.send_signal(signal.SIGUSR2)

    def stop(self) -> None:
        """``kill -9``: every link is cut and nothing listens on the port any more."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

"""TCP forwarder from a network namespace to the root namespace's loopback (fleet tests).

    python -m tests.fleet.forwarder NETNS ADDRESS PORT [PORT ...]

Listens on ADDRESS:PORT inside the named namespace (``/var/run/netns/NETNS``) and connects
each accepted connection to 127.0.0.1:PORT in the namespace it was started in, so workers in
host namespaces reach the shared servers while the root namespace keeps no address on the
fleet's bridge. The listening sockets are made after ``setns`` into NETNS; the thread then
switches back, and sockets keep the namespace they were made in. When either side of a
connection closes or fails, both are aborted (no half-closed leftovers). Prints ``ready``.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import sys

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def listen_in(netns: str, address: str, ports: list[int]) -> list[socket.socket]:
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            socks = []
            for port in ports:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((address, port))
                sock.listen(512)
                sock.setblocking(False)
                socks.append(sock)
            return socks
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, done: asyncio.Event) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        done.set()


async def _serve(port: int, host_reader: asyncio.StreamReader, host_writer: asyncio.StreamWriter) -> None:
    try:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        host_writer.transport.abort()
        return
    done = asyncio.Event()
    tasks = [
        asyncio.ensure_future(_pipe(host_reader, server_writer, done)),
        asyncio.ensure_future(_pipe(server_reader, host_writer, done)),
    ]
    await done.wait()
    for writer in (host_writer, server_writer):
        writer.transport.abort()
    for task in tasks:
        task.cancel()


async def main(netns: str, address: str, ports: list[int]) -> None:
    socks = listen_in(netns, address, ports)
    servers = []
    for port, sock in zip(ports, socks, strict=True):

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter, port: int = port) -> None:
            await _serve(port, r, w)

        servers.append(await asyncio.start_server(handle, sock=sock))
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], [int(p) for p in sys.argv[3:]]))

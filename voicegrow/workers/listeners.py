"""Listening sockets that several worker processes share: bound by the parent, adopted by fd.

Why the parent binds, one ``SO_REUSEPORT`` socket per worker (rather than each worker binding, or one
socket that every worker accepts from):

- Port 0 (any free port, as tests use) resolves once, in the parent, and every worker gets that port.
- The kernel spreads new connections evenly over the sockets by a hash of the addresses. With one
  shared accept queue, whichever worker wakes first takes a whole burst of reconnecting speakers.
- The parent keeps every socket open while a worker restarts: connections the kernel hashed to a dead
  worker's socket wait in its backlog for the replacement instead of being refused, and the port is
  never closed.

Without ``SO_REUSEPORT`` (not Linux or BSD) all workers share one socket, which is correct, only less
even.
"""

from __future__ import annotations

import socket

import trio

__all__ = ["bind_shared", "adopt_listener", "reuse_port_supported"]

_BACKLOG = min(socket.SOMAXCONN, 0xFFFF)


def reuse_port_supported() -> bool:
    return hasattr(socket, "SO_REUSEPORT")


def bind_shared(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one TCP port of ``host`` (``""``: every address; ``port`` 0:
    a free port, the same for all). Element ``k`` is worker ``k``'s; without ``SO_REUSEPORT`` they are
    one socket. Blocking; the caller closes them."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    if host in ("", "::") and any(info[0] == socket.AF_INET6 for info in infos):
        family, kind, proto, _, address = next(info for info in infos if info[0] == socket.AF_INET6)
    reuse_port = reuse_port_supported()
    sockets: list[socket.socket] = []
    try:
        for _ in range(count if reuse_port else 1):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # '::' serves IPv4 too, as the single-process server does
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(address)
            address = sock.getsockname()  # port 0 became a concrete port: the next sockets take it
            sock.listen(_BACKLOG)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets if reuse_port else sockets * count


def adopt_listener(fd: int) -> trio.SocketListener:
    """A trio listener over a listening socket inherited as file descriptor ``fd``."""
    return trio.SocketListener(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))

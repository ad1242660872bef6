"""The rendezvous of a spawned group, on loopback only: the store, its port, the ranks' sockets.

``start_store`` runs the group's ``TCPStore`` server in the PARENT (the process that calls
``spawn_group``), listening on 127.0.0.1 only. ``TCPStore("127.0.0.1", port, is_master=True)``
does not do that: with torch 2.13 it listens on every interface (``*:<port>``, seen with
``ss -ltn``), whatever host it is given. So the parent binds a socket to 127.0.0.1 port 0
itself and hands it over (``master_listen_fd``); the kernel picks a free port and the socket
keeps it, so no other process can take the port between "found free" and "bound" (the race
of releasing a free port before the ranks bind it). Should the store still fail to start
with "address in use" it is retried on a fresh socket, ``STORE_ATTEMPTS`` times.

``join_group`` (in a rank) connects to that store and opens the gloo process group with
``GLOO_SOCKET_IFNAME`` set to the loopback interface, so the ranks' own gloo sockets listen
on loopback too, whatever the machine's hostname resolves to. A store in the parent also
outlives every rank: rank 0 no longer tears the store down under a peer that is still in
its last collective.
"""
from __future__ import annotations

import datetime
import errno
import os
import socket

import torch.distributed as dist

__all__: list[str] = []  # internals of spawn_group

LOOPBACK = "127.0.0.1"
STORE_ATTEMPTS = 3
_RETRYABLE_ERRNOS = {errno.EADDRINUSE, errno.EADDRNOTAVAIL}


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK, 0))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _server_store(sock: socket.socket, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(LOOPBACK, sock.getsockname()[1], None, True,
                         datetime.timedelta(seconds=timeout_s), wait_for_workers=False,
                         master_listen_fd=sock.fileno())


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _RETRYABLE_ERRNOS:
        return True
    text = str(exc).lower()
    return "address already in use" in text or "address not available" in text


def start_store(timeout_s: float, *, attempts: int = STORE_ATTEMPTS) -> tuple[dist.TCPStore, int]:
    """The group's store server on 127.0.0.1 and its port; retried on "address in use".

    Raises:
      RuntimeError: naming every attempt, when all ``attempts`` failed with an
        address-in-use error; any other error at once.
    """
    failures = []
    for _ in range(attempts):
        sock = None
        try:
            sock = _listening_socket()
            store = _server_store(sock, timeout_s)
        except (OSError, RuntimeError) as exc:
            if sock is not None:
                sock.close()
            if not _retryable(exc):
                raise
            failures.append(f"{type(exc).__name__}: {exc}")
            continue
        port = sock.getsockname()[1]
        sock.detach()  # the store owns (and closes) the descriptor now
        return store, port
    raise RuntimeError(f"could not start the rendezvous store on {LOOPBACK} after {attempts} "
                       "attempts, each on a fresh port: " + "; ".join(failures))


def loopback_interface() -> str | None:
    """The name of the loopback network interface ('lo' on Linux, 'lo0' on macOS), if any."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in names if n.startswith("lo")), None)


def join_group(rank: int, world_size: int, port: int, timeout_s: float) -> None:
    """Inside a rank: connect to the parent's store and open the gloo group on loopback."""
    interface = loopback_interface()
    if interface is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = interface
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(LOOPBACK, port, None, False, timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=timeout)

"""Minimal systemd integration: sd_notify and socket activation, no library needed.

Both follow systemd's documented protocols (sd_notify(3), sd_listen_fds(3)) and
work with systemd's own test tools: a ``NOTIFY_SOCKET`` datagram socket and
``systemd-socket-activate``. Nothing here needs systemd as PID 1.
"""

from __future__ import annotations

import os
import socket
import stat

SD_LISTEN_FDS_START = 3

_ACTIVATED: socket.socket | None = None


class ActivationError(RuntimeError):
    """systemd passed us something we must not serve on; the message says what."""


def notify(message: str) -> bool:
    """Send READY=1 / STOPPING=1 / WATCHDOG=1 / STATUS=... to systemd when it asked for it.

    Non-blocking: a full or missing notify socket never stalls the event loop.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(message.encode(), address)
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd set for us, in seconds (systemd's recommendation)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2_000_000 if value > 0 else None


def activation_socket() -> socket.socket | None:
    """The listening socket systemd passed us (reflowd.socket), if any.

    The first call takes it and removes ``LISTEN_*`` from the environment (as
    ``sd_listen_fds(1)`` does), so processes we start never see them; later
    calls return the same object, so the daemon can still tell at shutdown that
    the socket file belongs to systemd and must stay. Anything but a listening
    Unix stream socket is refused: the peer-uid check needs ``SO_PEERCRED``.
    """
    global _ACTIVATED
    if _ACTIVATED is not None:
        return _ACTIVATED
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        count = 0
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count < 1:
        return None
    if count > 1:
        raise ActivationError(f"systemd passed {count} sockets; reflowd.socket must have exactly one ListenStream= line")
    fd = SD_LISTEN_FDS_START
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise ActivationError(f"LISTEN_FDS=1 but fd {fd} is not open ({exc.strerror})") from None
    if not stat.S_ISSOCK(mode):
        raise ActivationError(f"fd {fd} passed by systemd is not a socket; check reflowd.socket")
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ActivationError(
            "systemd passed a socket that is not a Unix stream socket; reflowd serves only a Unix socket "
            "(ListenStream=%t/reflow/reflowd.sock), because only there can it check who connects"
        )
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ActivationError("the socket systemd passed is not listening; use Accept=no in reflowd.socket")
    os.set_inheritable(fd, False)
    _ACTIVATED = sock
    return sock

"""Minimal systemd integration: sd_notify and socket activation, no library needed."""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3


def notify(message: str) -> bool:
    """Send READY=1 / STOPPING=1 / WATCHDOG=1 to systemd when it asked for it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto(message.encode(), address)
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd set for us, in seconds."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000


def activation_socket() -> socket.socket | None:
    """The listening socket systemd passed us (reflowd.socket), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    if int(os.environ.get("LISTEN_FDS", "0")) < 1:
        return None
    return socket.socket(fileno=SD_LISTEN_FDS_START)

"""Which network interface carries which address (Linux, standard library only): gloo has no
"every interface but lo and docker*" form, so a job that spans nodes names the interface itself."""

from __future__ import annotations

import socket


def interface_names() -> list[str]:
    """This machine's network interfaces, in the kernel's order (lo first on Linux)."""
    try:
        return [name for _, name in socket.if_nameindex()]
    except OSError:
        return []


def interface_of(ip: str) -> str | None:
    """The network interface that holds `ip`, e.g. ens5 for the private IP, lo for 127.0.0.1."""
    try:
        import fcntl
        import struct
    except ImportError:
        return None
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                raw = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
            except OSError:
                continue
        if socket.inet_ntoa(raw[20:24]) == ip:
            return name
    return None


def interface_to(host: str) -> str | None:
    """The interface this machine reaches `host` through: the source address of its route (a UDP
    connect sends nothing, it only picks the route), or None when there is no route."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((host, 9))
            ip = sock.getsockname()[0]
    except OSError:
        return None
    return interface_of(ip)

"""A process tree read from /proc (Linux): its descendants, whether they live, and the TCP
sockets they listen on (what a run exposes)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from pipeline.launch.reaper import alive, descendants

__all__ = ["alive", "descendants", "listening_sockets"]

LISTEN = "0A"


def _address(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    # /proc/net/tcp{,6} prints each 32-bit word in host (little-endian) order.
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip)


def _listening_inodes() -> dict[int, tuple[str, int]]:
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == LISTEN:
                addr, port = cols[1].split(":")
                found[int(cols[9])] = (_address(addr), int(port, 16))
    return found


def listening_sockets(root: int | None = None) -> set[tuple[str, int, str]]:
    """`(address, port, process name)` of every listening socket of `root` (default: this
    process) and its descendants."""
    root = os.getpid() if root is None else root
    inodes = _listening_inodes()
    found = set()
    for pid in descendants(root) | {root}:
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                inode = int(link[8:-1])
                if inode in inodes:
                    found.add((*inodes[inode], os.path.basename(name)))
    return found

"""A delay line between two network namespaces, for the NAT matrix (nat_matrix.rs).

This kernel has no netem, so latency is added in user space: a TUN device in each namespace,
and every IP packet read from one is written to the other `delay_ms` later (in order). The
harness gives the devices addresses and routes; this script only carries packets.

Usage: python3 nat_wire.py <ns-a> <tun-a> <ns-b> <tun-b> <delay_ms>
Prints "ready" once both devices are open; runs until killed.
"""

import ctypes
import fcntl
import heapq
import os
import select
import struct
import sys
import time

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000

libc = ctypes.CDLL("libc.so.6", use_errno=True)


def open_tun(ns: str, name: str) -> int:
    """Enters namespace `ns` and opens its TUN device `name` (created by the harness)."""
    with open(f"/var/run/netns/{ns}") as f:
        if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def main() -> None:
    ns_a, tun_a, ns_b, tun_b, delay_ms = sys.argv[1:6]
    delay = int(delay_ms) / 1000.0
    a = open_tun(ns_a, tun_a)
    b = open_tun(ns_b, tun_b)
    other = {a: b, b: a}
    pending: list[tuple[float, int, int, bytes]] = []  # (due, seq, to, packet)
    seq = 0
    print("ready", flush=True)
    while True:
        timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else None
        readable, _, _ = select.select([a, b], [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            while True:
                try:
                    packet = os.read(fd, 65535)
                except BlockingIOError:
                    break
                seq += 1
                heapq.heappush(pending, (now + delay, seq, other[fd], packet))
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, to, packet = heapq.heappop(pending)
            try:
                os.write(to, packet)
            except OSError:
                pass  # a full device queue drops the packet, as a link would


if __name__ == "__main__":
    main()

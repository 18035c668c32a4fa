#!/usr/bin/env python3
"""Small network probes for kxp's namespace tests and demo (no ping/nc needed).

  netcheck.py udp HOST PORT MESSAGE [--timeout S]   send one datagram, print the answer
  netcheck.py ping HOST [--timeout S]               one ICMP echo (raw socket, root)

Exit status 0 on an answer, 1 on timeout or error (the reason on stderr).
"""
import argparse
import os
import socket
import struct
import sys
import time


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def udp(a):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(a.timeout)
    s.sendto(a.message.encode(), (a.host, a.port))
    data, _ = s.recvfrom(65535)
    print(data.decode(errors="replace"))


def ping(a):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
    payload = b"kxp-netcheck"
    pkt = struct.pack("!BBHHH", 8, 0, checksum(hdr + payload), ident, 1) + payload
    s.sendto(pkt, (a.host, 0))
    deadline = time.monotonic() + a.timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no echo reply")
        s.settimeout(left)
        data, peer = s.recvfrom(65535)
        ihl = (data[0] & 0x0F) * 4
        typ, _, _, rid, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
        if typ == 0 and rid == ident and peer[0] == a.host:
            print("echo reply from %s" % peer[0])
            return


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("udp")
    u.add_argument("host")
    u.add_argument("port", type=int)
    u.add_argument("message")
    u.add_argument("--timeout", type=float, default=2.0)
    q = sub.add_parser("ping")
    q.add_argument("host")
    q.add_argument("--timeout", type=float, default=2.0)
    a = p.parse_args()
    try:
        {"udp": udp, "ping": ping}[a.cmd](a)
    except Exception as e:  # noqa: BLE001 - any failure is "no answer"
        sys.stderr.write("%s %s: %s\n" % (a.cmd, a.host, e))
        sys.exit(1)


if __name__ == "__main__":
    main()

"""The kernel's own bans, as they happen: an NFLOG group subscriber.

The kernel trap bans in the input hook, before any process knows. Its ban
rules also `log group N`, so each ban it makes arrives here as the packet
that caused it (with the kernel's timestamp); the daemon then logs, records
and shares it like a ban of its own. One message per ban, not per packet:
the next packet from that source is dropped before the trap.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from . import packets
from .engine import TCP, UDP, Kind, Probe, classify_tcp
from .netlink import (NETLINK_NETFILTER, NFGEN, NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, attr,
                      attributes, error_code, message_end, messages, nfnl_message, receive_buffer)

NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_TIMEOUT, NFULA_CFG_QTHRESH = 1, 2, 4, 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULA_TIMESTAMP, NFULA_PAYLOAD, NFULA_PREFIX = 3, 9, 10
KERNEL_LOG_BUFFER = 8 << 20  # ~10,000 messages: half a second of a 20,000/s flood
COPY_RANGE = 4096  # IP, extension headers (248 bytes of options seen in tests) and TCP/UDP


class NflogError(OSError):
    pass


class KernelBanLog:
    """Subscribes to one NFLOG group; `read()` yields (what, probe) for each
    message whose prefix is one of `prefixes` (prefix -> what): a kernel ban,
    and with the kernel as the sensor a trap hit or a first contact."""

    needs_listener_check = False
    kernel_log = True

    def __init__(self, group: int, prefix: str, prefixes: dict[str, str] | None = None):
        self.group, self.prefix = group, prefix.encode()
        self.prefixes = {p.encode(): what for p, what in (prefixes or {prefix: "ban"}).items()}
        self.malformed = 0
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.bind((0, 0))
            receive_buffer(self.sock, KERNEL_LOG_BUFFER)
            self._configure(attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])))
            self._configure(attr(NFULA_CFG_MODE, struct.pack("!IBB", COPY_RANGE,
                                                             NFULNL_COPY_PACKET, 0))
                            + attr(NFULA_CFG_QTHRESH, struct.pack("!I", 1))
                            + attr(NFULA_CFG_TIMEOUT, struct.pack("!I", 0)))
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise

    def _configure(self, body: bytes) -> None:
        self.sock.send(nfnl_message(NFNL_SUBSYS_ULOG, NFULNL_MSG_CONFIG,
                                    NLM_F_REQUEST | NLM_F_ACK, 0, socket.AF_UNSPEC, body,
                                    self.group))
        self.sock.settimeout(2.0)
        data = self.sock.recv(65536)
        for kind, _, at in messages(data):
            if kind == NLMSG_ERROR and error_code(data, at):
                code = error_code(data, at)
                raise NflogError(code, f"NFLOG group {self.group}: {os.strerror(code)}")

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def read(self):
        for _ in range(64):
            try:
                data = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            for kind, _, at in messages(data):
                if kind & 0xFF != NFULNL_MSG_PACKET or kind >> 8 != NFNL_SUBSYS_ULOG:
                    continue
                logged = self.to_logged(_attributes(data, at + NFGEN.size))
                if logged is not None:
                    yield logged

    def to_probe(self, attrs: dict[int, bytes]) -> Probe | None:
        """The probe of a kernel ban message, or None."""
        logged = self.to_logged(attrs)
        return logged[1] if logged is not None and logged[0] == "ban" else None

    def to_logged(self, attrs: dict[int, bytes]) -> tuple[str, Probe] | None:
        what = self.prefixes.get(attrs.get(NFULA_PREFIX, b"").rstrip(b"\0"))
        if what is None:
            return None  # another rule's log line on our group
        packet = packets.parse(attrs.get(NFULA_PAYLOAD, b""), probes_only=False)
        if packet is None:
            self.malformed += 1
            return None
        stamp = attrs.get(NFULA_TIMESTAMP)
        when = time.time()
        if stamp and len(stamp) >= 16:
            seconds, micros = struct.unpack("!QQ", stamp[:16])
            when = seconds + micros / 1e6
        protocol, port = packet.protocol, packet.port
        kind = (classify_tcp(packet.flags) if protocol == TCP
                else Kind.UDP if protocol == UDP else Kind.PROTOCOL)
        name = packets.TRANSPORT_NAMES.get(port) if kind is Kind.PROTOCOL else None
        if name is not None and what != "proto":  # an SCTP, UDP-Lite or DCCP port probe
            kind, protocol, port = Kind.TRANSPORT, name, packet.service
        return what, Probe(packet.source, port, protocol, kind, when,
                           packet.flags, packet.ip_options,
                           trap=what not in ("contact", "served"),
                           source_port=packet.source_port, destination=packet.destination)


_WANTED = frozenset((NFULA_TIMESTAMP, NFULA_PAYLOAD, NFULA_PREFIX))


def _attributes(data: bytes, at: int) -> dict[int, bytes]:
    """The top-level attributes of one message that `to_logged` reads (its
    length bounds the walk): one message a probe, so only those are copied."""
    return attributes(data, at, message_end(data, at - NFGEN.size), _WANTED)

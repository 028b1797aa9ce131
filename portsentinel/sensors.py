"""Sensors: turn network activity into probes for the engine.

- `ListenSensor` (tcp/udp modes): binds the trap ports; a TCP probe is only a
  completed handshake (accept), so its source cannot be spoofed.
- `PacketSensor` (stcp/sudp/atcp/audp): one AF_PACKET socket for IPv4 and IPv6
  with a kernel BPF filter; each candidate is parsed and checked against the
  trap ports. Whether a real service uses the port is the engine's question,
  answered by the daemon only for sources that still count.
- `ChallengeSensor`: the catch-all socket a peer's SYN to a trap port is
  redirected to; a completed handshake there is a probe that cannot be spoofed.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from dataclasses import dataclass

from . import bpf, packets
from .addrset import AddressSet, canonical
from .engine import TCP, UDP, Kind, Probe, classify_tcp
from .netlink import receive_buffer

ETH_P_ALL = 0x0003
SO_TIMESTAMPNS = 35
BATCH = 256  # most packets handled per wake-up, so one sensor cannot starve the rest


@dataclass(frozen=True)
class TrapPorts:
    """Which ports are traps for one protocol's mode (before the in-use check)."""

    mode: str  # tcp, stcp, atcp, udp, sudp, audp
    ports: frozenset[int] = frozenset()
    advanced_limit: int = 1024
    exclude: frozenset[int] = frozenset()

    @property
    def advanced(self) -> bool:
        return self.mode.startswith("a")

    @property
    def limit(self) -> int:
        """Ports at or above this are never traps (lets BPF drop them)."""
        return self.advanced_limit if self.advanced else max(self.ports, default=0) + 1

    def all_ports(self) -> frozenset[int]:
        if self.advanced:
            return frozenset(range(self.advanced_limit)) - self.exclude
        return self.ports

    def watches(self, port: int) -> bool:
        if self.advanced:
            return port < self.advanced_limit and port not in self.exclude
        return port in self.ports


class _SocketSensor:
    """A non-blocking socket read in bounded batches; `_take` gives one
    probe (or None to skip) and raises BlockingIOError when drained. `read`
    yields each probe as soon as it is parsed, so the caller can act on it
    before reading the rest of the batch."""

    sock: socket.socket
    needs_listener_check = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def read(self):
        for _ in range(BATCH):
            try:
                probe = self._take()
            except (BlockingIOError, InterruptedError):
                return
            if probe is not None:
                yield probe

    def _take(self) -> Probe | None:
        raise NotImplementedError


class PacketSensor(_SocketSensor):
    # Probes come out before the "is the port served?" check: the daemon asks
    # that (ListeningPorts) only for sources the engine still cares about.
    needs_listener_check = True

    def __init__(self, traps: dict[str, TrapPorts], local: AddressSet,
                 tcp_contacts: bool = False):
        self.traps = traps  # protocol -> TrapPorts, for the protocols watched here
        self.local = local
        # every TCP port, not just traps: first contacts for the sequential test
        self.tcp_contacts = tcp_contacts and TCP in traps
        self.malformed = 0
        self._buffer = bytearray(bpf.SNAPLEN_EXTENDED)  # reused: no allocation per packet
        self._view = memoryview(self._buffer)
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        try:
            bpf.attach(self.sock, bpf.probe_filter(
                tcp=TCP in traps, udp=UDP in traps,
                tcp_limit=(65536 if self.tcp_contacts else traps[TCP].limit) if TCP in traps else 0,
                udp_limit=traps[UDP].limit if UDP in traps else 0))
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            receive_buffer(self.sock, 4 << 20)
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise

    def _take(self) -> Probe | None:
        size, ancillary, _, _ = self.sock.recvmsg_into([self._buffer], 64)
        data = bytes(self._view[:size])
        try:
            return self.to_probe(data, _kernel_time(ancillary))
        except Exception:  # whatever a packet holds, the sensor goes on
            self.malformed += 1
            return None

    def to_probe(self, data: bytes, stamp: float) -> Probe | None:
        packet = packets.parse(data)
        if packet is None:
            self.malformed += 1
            return None
        traps = self.traps.get(packet.protocol)
        if traps is None:
            return None
        trap = traps.watches(packet.port)
        if not trap and not (self.tcp_contacts and packet.protocol == TCP):
            return None
        if packet.destination not in self.local:
            return None  # routed through, not for us
        kind = classify_tcp(packet.flags) if packet.protocol == TCP else Kind.UDP
        if packet.truncated:
            kind = Kind.FRAGMENT
        return Probe(packet.source, packet.port, packet.protocol, kind, stamp,
                     packet.flags, packet.ip_options, trap=trap,
                     source_port=packet.source_port, destination=packet.destination)


def _kernel_time(ancillary) -> float:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            seconds, nanos = struct.unpack("qq", data[:16])
            return seconds + nanos / 1e9
    return time.time()


_unmapped = canonical  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d


class ListenSensor(_SocketSensor):
    """One bound socket (dual-stack when IPv6 is available) on a trap port."""

    def __init__(self, protocol: str, port: int, banner: str | None = None):
        self.protocol, self.port = protocol, port
        self.banner = (banner.encode() + b"\n") if banner else None
        kind = socket.SOCK_STREAM if protocol == TCP else socket.SOCK_DGRAM
        self.sock = _bind_dual_stack(kind, port)
        if protocol == TCP:
            self.sock.listen(64)
        self.sock.setblocking(False)

    def _take(self) -> Probe | None:
        try:
            peer = self._peer()
        except (BlockingIOError, InterruptedError):
            raise
        except OSError as err:  # e.g. ECONNABORTED: the peer gave up; keep going
            if err.errno in (errno.ECONNABORTED, errno.EPROTO, errno.ECONNRESET):
                return None
            raise
        return Probe(_unmapped(peer[0]), self.port, self.protocol, Kind.CONNECT, time.time())

    def _peer(self):
        if self.protocol == TCP:
            conn, peer = self.sock.accept()
            with conn:
                if self.banner:
                    try:
                        conn.setblocking(False)
                        conn.send(self.banner)
                    except OSError:
                        pass
            return peer
        _, peer = self.sock.recvfrom(2048)
        if self.banner:
            try:
                self.sock.sendto(self.banner, peer)
            except OSError:
                pass
        return peer


SO_ORIGINAL_DST = 80  # IPv4 (SOL_IP) and IPv6 (SOL_IPV6, IP6T_SO_ORIGINAL_DST) alike


class ChallengeSensor(_SocketSensor):
    """The catch-all socket that peers' SYNs to TCP trap ports are redirected
    to: an accepted connection proves its source, and reports the trap port
    it was really sent to (SO_ORIGINAL_DST)."""

    def __init__(self):
        self.sock = _bind_dual_stack(socket.SOCK_STREAM, 0)
        self.sock.listen(128)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    def _take(self) -> Probe | None:
        try:
            conn, peer = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            raise
        except OSError:  # the peer gave up before we got to it
            return None
        with conn:
            port = _original_port(conn, peer[0])
        if port is None:
            return None
        return Probe(_unmapped(peer[0]), port, TCP, Kind.CONNECT, time.time())


def _original_port(conn: socket.socket, peer: str) -> int | None:
    try:
        if conn.family == socket.AF_INET6 and not peer.startswith("::ffff:"):
            raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        else:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    return int.from_bytes(raw[2:4], "big")


def _bind_dual_stack(kind: int, port: int) -> socket.socket:
    if socket.has_ipv6:
        sock = socket.socket(socket.AF_INET6, kind)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            _reuse_if_stream(sock, kind)
            sock.bind(("::", port))
            return sock
        except OSError as err:
            sock.close()
            if err.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
    sock = socket.socket(socket.AF_INET, kind)
    try:
        _reuse_if_stream(sock, kind)
        sock.bind(("0.0.0.0", port))
    except BaseException:
        sock.close()
        raise
    return sock


def _reuse_if_stream(sock: socket.socket, kind: int) -> None:
    # TCP: rebind over TIME_WAIT after a restart. Never for UDP, where
    # SO_REUSEADDR would let us share a port with a real service.
    if kind == socket.SOCK_STREAM:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

"""Add and delete nftables set elements with raw nfnetlink messages.

The ban is on the packet path, so it skips libnftables' parser and cache
(which re-reads our sets on every command): one NEWSETELEM batch on a
persistent netlink socket, acknowledged by the kernel, tens of microseconds.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import threading

from .addrset import canonical

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_DELSETELEM = 12, 13, 14
NFPROTO_INET = 1
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP = 0x1, 0x4, 0x400, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000
# attributes
SET_ELEM_LIST_TABLE, SET_ELEM_LIST_SET, SET_ELEM_LIST_ELEMENTS = 1, 2, 3
LIST_ELEM = 1
SET_ELEM_KEY, SET_ELEM_TIMEOUT, SET_ELEM_EXPIRATION = 1, 4, 5
DATA_VALUE = 1

CHUNK = 1000
_HDR = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")


def netlink_messages(data: bytes):
    """(type, seq, payload offset) of each netlink message in one datagram."""
    offset = 0
    while offset + _HDR.size <= len(data):
        length, kind, _, seq, _ = _HDR.unpack_from(data, offset)
        yield kind, seq, offset + _HDR.size
        offset += max((length + 3) & ~3, _HDR.size)


def attributes(data: bytes, start: int, end: int) -> dict[int, bytes]:
    """Netlink attributes in data[start:end], by type (nested flag cleared)."""
    found = {}
    end = min(end, len(data))
    while start + 4 <= end:
        size, kind = struct.unpack_from("=HH", data, start)
        if size < 4:
            break
        found[kind & 0x7FFF] = data[start + 4:start + size]
        start += (size + 3) & ~3
    return found


def answers(sock: socket.socket, seq: int, what: str) -> list[tuple[bytes, int, int]]:
    """The data messages answering request `seq`, as (datagram, payload start,
    payload end), once its acknowledgement came; ENOENT is no answer at all."""
    found = []
    while True:
        data = sock.recv(65536)
        for kind, got, at in netlink_messages(data):
            if got != seq:
                continue
            if kind != NLMSG_ERROR:  # an answer; the acknowledgement follows
                found.append((data, at, at - _HDR.size + struct.unpack_from("=I", data,
                                                                           at - _HDR.size)[0]))
                continue
            code = _error_code(data, at)
            if code and code != errno.ENOENT:
                raise OSError(code, f"{what}: {os.strerror(code)}")
            return found


def _error_code(data: bytes, at: int) -> int:
    """The errno an NLMSG_ERROR carries (0 = an acknowledgement)."""
    return -struct.unpack_from("=i", data, at)[0]


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _nested(kind: int, *children: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(children))


class SetElements:
    """Batch writer for the elements of one table's sets."""

    def __init__(self, table: str):
        self.table = table.encode() + b"\0"
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.bind((0, 0))
        self._seq = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        self._sock.close()

    def _message(self, kind: int, flags: int, family: int, body: bytes, res_id: int = 0) -> bytes:
        self._seq += 1
        payload = _NFGEN.pack(family, 0, socket.htons(res_id)) + body
        return _HDR.pack(_HDR.size + len(payload), kind, flags, self._seq, 0) + payload

    def _elements(self, set_name: str, addresses, timeout_ms: int | None) -> bytes:
        """`addresses` are ip objects, or (ip, timeout_ms) pairs when timeout_ms is None."""
        elements = []
        for address in addresses:
            each = timeout_ms
            if isinstance(address, tuple):
                address, each = address
            key = address if isinstance(address, bytes) else address.packed
            parts = [_nested(SET_ELEM_KEY, _attr(DATA_VALUE, key))]
            if each:
                parts.append(_attr(SET_ELEM_TIMEOUT, struct.pack("!Q", each)))
            elements.append(_nested(LIST_ELEM, *parts))
        return (_attr(SET_ELEM_LIST_TABLE, self.table)
                + _attr(SET_ELEM_LIST_SET, set_name.encode() + b"\0")
                + _nested(SET_ELEM_LIST_ELEMENTS, *elements))

    def _commit(self, operations: list[tuple[int, dict[str, list], int | None]]) -> None:
        """One transaction: every (kind, {set: addresses}, timeout) in order."""
        with self._lock:
            messages = [self._message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, b"",
                                      NFNL_SUBSYS_NFTABLES)]
            first_seq = self._seq + 1
            for kind, by_set, timeout_ms in operations:
                flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if kind == NFT_MSG_NEWSETELEM else 0)
                for set_name, addresses in by_set.items():
                    messages.append(self._message((NFNL_SUBSYS_NFTABLES << 8) | kind, flags,
                                                  NFPROTO_INET,
                                                  self._elements(set_name, addresses, timeout_ms)))
            messages.append(self._message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, b"",
                                          NFNL_SUBSYS_NFTABLES))
            self._sock.send(b"".join(messages))
            self._wait_acks(first_seq, self._seq - 1)

    def _wait_acks(self, first: int, last: int) -> None:
        pending = set(range(first, last + 1))
        failure = None
        while pending:
            data = self._sock.recv(65536)
            for kind, seq, at in netlink_messages(data):
                if kind == NLMSG_ERROR:
                    pending.discard(seq)
                    failure = failure or _error_code(data, at)
        if failure:
            raise OSError(failure, f"nftables set update: {os.strerror(failure)}")

    @staticmethod
    def _group(addresses) -> dict[str, list]:
        by_set: dict[str, list] = {}
        for address in addresses:
            item = address
            if isinstance(address, tuple):
                ip = canonical(address[0])
                item = (ip, int(address[1] * 1000) or None)
            else:
                ip = item = canonical(address)
            by_set.setdefault("ban4" if ip.version == 4 else "ban6", []).append(item)
        return by_set

    def add_each(self, pairs) -> None:
        """Add (address, timeout seconds) pairs, each with its own timeout (0 = none)."""
        self._each_chunk(NFT_MSG_NEWSETELEM, [tuple(p) for p in pairs], None)

    def add(self, addresses, timeout: float = 0) -> None:
        """Add addresses (existing ones are left as they are); timeout in s, 0 = none."""
        self._each_chunk(NFT_MSG_NEWSETELEM, addresses, int(timeout * 1000) or None)

    def delete(self, addresses) -> None:
        self._each_chunk(NFT_MSG_DELSETELEM, addresses, None)

    def _each_chunk(self, kind: int, addresses, timeout_ms: int | None) -> None:
        # an attribute's length is 16 bits: ~1,000 elements fit in one message
        addresses = list(addresses)
        for start in range(0, len(addresses), CHUNK):
            by_set = self._group(addresses[start:start + CHUNK])
            if by_set:
                self._commit([(kind, by_set, timeout_ms)])

    def add_to(self, set_name: str, addresses, timeout: float = 0) -> None:
        """Add to a named set of this table (one family)."""
        addresses = list(addresses)
        for start in range(0, len(addresses), CHUNK):
            self._commit([(NFT_MSG_NEWSETELEM, {set_name: addresses[start:start + CHUNK]},
                           int(timeout * 1000) or None)])

    def delete_keys(self, set_name: str, keys: list[bytes]) -> None:
        """Delete raw keys from one set (no address canonicalisation)."""
        self._commit([(NFT_MSG_DELSETELEM, {set_name: keys}, None)])

    def refresh_ports(self, set_name: str, ports, timeout: float) -> None:
        """Put ports in an inet_service set with a fresh timeout (add, delete,
        add: a plain add would keep an existing element's old timeout)."""
        keys = [struct.pack("!H", p) for p in sorted(ports)]
        for start in range(0, len(keys), CHUNK):
            chunk = {set_name: keys[start:start + CHUNK]}
            self._commit([(NFT_MSG_NEWSETELEM, chunk, None), (NFT_MSG_DELSETELEM, chunk, None),
                          (NFT_MSG_NEWSETELEM, chunk, int(timeout * 1000) or None)])

    def contains(self, set_name: str, address) -> bool:
        """One GETSETELEM round trip: is `address` in the set?"""
        ip = ipaddress.ip_address(address)
        body = self._elements(set_name, [ip], None)
        with self._lock:
            message = self._message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM,
                                    NLM_F_REQUEST | NLM_F_ACK, NFPROTO_INET, body)
            self._sock.send(message)
            return bool(answers(self._sock, self._seq, "nftables get element"))

    def replace(self, addresses, timeout: float = 0) -> None:
        """Set the timeout of addresses whether or not they are in the set yet:
        add (if missing), delete, add with the timeout, in one transaction."""
        addresses = list(addresses)
        for start in range(0, len(addresses), CHUNK):
            by_set = self._group(addresses[start:start + CHUNK])
            if by_set:
                self._commit([(NFT_MSG_NEWSETELEM, by_set, None),
                              (NFT_MSG_DELSETELEM, by_set, None),
                              (NFT_MSG_NEWSETELEM, by_set, int(timeout * 1000) or None)])


def dump_set(table: str, set_name: str) -> dict[str, float | None]:
    """Every element of one address set: address -> seconds left (None: no
    timeout). Its own socket, so a long dump never holds up the ban path."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        body = (_attr(SET_ELEM_LIST_TABLE, table.encode() + b"\0")
                + _attr(SET_ELEM_LIST_SET, set_name.encode() + b"\0"))
        payload = _NFGEN.pack(NFPROTO_INET, 0, 0) + body
        sock.send(_HDR.pack(_HDR.size + len(payload),
                            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM,
                            NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + payload)
        found: dict[str, float | None] = {}
        while True:
            data = sock.recv(1 << 20)
            for kind, _, at in netlink_messages(data):
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    code = _error_code(data, at)
                    raise OSError(code, f"nftables set {set_name}: {os.strerror(code)}")
                length = struct.unpack_from("=I", data, at - _HDR.size)[0]
                _elements_into(found, data, at + _NFGEN.size, at - _HDR.size + length)
    finally:
        sock.close()


def _elements_into(found: dict, data: bytes, start: int, end: int) -> None:
    listed = attributes(data, start, end).get(SET_ELEM_LIST_ELEMENTS, b"")
    at, size = 0, len(listed)
    while at + 4 <= size:
        length = struct.unpack_from("=H", listed, at)[0]
        if length < 4:
            break
        element = attributes(listed, at + 4, at + length)
        key = attributes(element.get(SET_ELEM_KEY, b""), 0, 64).get(DATA_VALUE)
        if key is not None and len(key) in (4, 16):
            expires = element.get(SET_ELEM_EXPIRATION)
            found[str(ipaddress.ip_address(key))] = (
                struct.unpack("!Q", expires)[0] / 1000 if expires else None)
        at += (length + 3) & ~3


def is_missing(err: OSError) -> bool:
    return err.errno == errno.ENOENT

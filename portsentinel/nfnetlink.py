"""Add and delete nftables set elements with raw nfnetlink messages.

The ban is on the packet path, so it skips libnftables' parser and cache
(which re-reads our sets on every command): one NEWSETELEM batch on a
persistent netlink socket, acknowledged by the kernel, tens of microseconds.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading

from .addrset import canonical
from .netlink import (NETLINK_NETFILTER, NFGEN, NLA_F_NESTED, NLM_F_ACK, NLM_F_APPEND,
                      NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, answers,
                      attr, attributes, error_code, message_end, messages, nfnl_message, nested)

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_DELSETELEM = 12, 13, 14
NFPROTO_INET, NFPROTO_BRIDGE = 1, 7
# attributes
SET_ELEM_LIST_TABLE, SET_ELEM_LIST_SET, SET_ELEM_LIST_ELEMENTS = 1, 2, 3
LIST_ELEM = 1
SET_ELEM_KEY, SET_ELEM_TIMEOUT, SET_ELEM_EXPIRATION = 1, 4, 5
SET_ELEM_EXPR, SET_ELEM_EXPRESSIONS = 7, 10  # an element's expressions: one, or a list
EXPR_NAME, EXPR_DATA = 1, 2  # an expression's name and data
COUNTER_BYTES, COUNTER_PACKETS = 1, 2
DATA_VALUE = 1

CHUNK = 1000


# an address key's attributes, whose sizes need no padding: made once (a restart
# sends 100,000 of them)
_KEY_ATTRS = {n: nested(SET_ELEM_KEY, attr(DATA_VALUE, b"\0" * n))[:-n] for n in (4, 16)}
_TIMEOUT_ATTR = attr(SET_ELEM_TIMEOUT, b"\0" * 8)[:-8]
_ELEMENT = struct.Struct("=HH")


def _element(key: bytes, timeout_ms: int | None, counted: tuple[int, int] | None = None) -> bytes:
    """`counted`: (packets, bytes) its counter starts from (a ban put back
    or given a new timeout keeps what it dropped)."""
    head = _KEY_ATTRS.get(len(key))
    if head is None or counted:  # a port (2 bytes): padded, the general way
        parts = [nested(SET_ELEM_KEY, attr(DATA_VALUE, key))]
        if timeout_ms:
            parts.append(attr(SET_ELEM_TIMEOUT, struct.pack("!Q", timeout_ms)))
        if counted:
            parts.append(nested(SET_ELEM_EXPR, _counter_expr(*counted)))  # as nft does
        return nested(LIST_ELEM, *parts)
    body = head + key + (_TIMEOUT_ATTR + timeout_ms.to_bytes(8, "big") if timeout_ms else b"")
    return _ELEMENT.pack(4 + len(body), LIST_ELEM | NLA_F_NESTED) + body


def _counter_expr(packets: int, octets: int) -> bytes:
    return attr(EXPR_NAME, b"counter\0") + nested(
        EXPR_DATA, attr(COUNTER_BYTES, struct.pack("!Q", octets)),
        attr(COUNTER_PACKETS, struct.pack("!Q", packets)))


def elements_body(table: bytes, set_name: str, addresses, timeout_ms: int | None) -> bytes:
    """A set-element list. `addresses` are ip objects or raw keys, or when
    timeout_ms is None (key, timeout_ms) or (key, timeout_ms, (packets, bytes))."""
    elements = []
    for address in addresses:
        each, counted = timeout_ms, None
        if isinstance(address, tuple):
            address, each, *rest = address
            counted = rest[0] if rest else None
        elements.append(_element(address if isinstance(address, bytes) else address.packed,
                                 each, counted))
    return (attr(SET_ELEM_LIST_TABLE, table) + attr(SET_ELEM_LIST_SET, set_name.encode() + b"\0")
            + nested(SET_ELEM_LIST_ELEMENTS, *elements))


def _edge(kind: int, seq: int) -> bytes:
    """A transaction's begin or end message (the kernel acknowledges neither)."""
    return nfnl_message(0, kind, NLM_F_REQUEST, seq, 0, b"", NFNL_SUBSYS_NFTABLES)


def batch(table: bytes, operations, seq: int,
          family: int = NFPROTO_INET) -> tuple[bytes, int, int]:
    """One nf_tables transaction of every (kind, {set: addresses}, timeout_ms)
    in order: the datagram, and the first and last sequence numbers that the
    kernel acknowledges (the batch's begin and end are not acknowledged)."""
    parts = [_edge(NFNL_MSG_BATCH_BEGIN, seq)]
    first = seq + 1
    for kind, by_set, timeout_ms in operations:
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if kind == NFT_MSG_NEWSETELEM else 0)
        for set_name, addresses in by_set.items():
            seq += 1
            parts.append(nfnl_message(NFNL_SUBSYS_NFTABLES, kind, flags, seq, family,
                                      elements_body(table, set_name, addresses, timeout_ms)))
    seq += 1
    parts.append(_edge(NFNL_MSG_BATCH_END, seq))
    return b"".join(parts), first, seq - 1


STATIC_SETS = ("trap_tcp", "trap_udp", "never4", "never6")  # only we change them, by command


class OwnCommits:
    """The generation up to which every commit was one of ours that changed
    only dynamic sets' elements (bans, served ports, the hold's releases),
    counted from a generation at which our table was found intact: it is
    intact there too, unlisted. A commit of anyone else's in between breaks
    the chain (each commit moves the generation by one)."""

    def __init__(self):
        self.trusted: int | None = None
        self._lock = threading.Lock()

    def checked(self, generation: int | None) -> None:
        with self._lock:
            self.trusted = generation

    def committed(self, sets: set[str], generation: int) -> None:
        with self._lock:
            if self.trusted is not None and generation == self.trusted + 1 \
                    and sets.isdisjoint(STATIC_SETS):
                self.trusted = generation


OWN_COMMITS = OwnCommits()


class SetElements:
    """Batch writer for the elements of one table's sets (of `family`)."""

    def __init__(self, table: str, family: int = NFPROTO_INET):
        self.table, self.family = table.encode() + b"\0", family
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.bind((0, 0))
        self._seq = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        self._sock.close()

    def _commit(self, operations: list[tuple[int, dict[str, list], int | None]]) -> None:
        """One transaction: every (kind, {set: addresses}, timeout) in order."""
        with self._lock:
            data, first, last = batch(self.table, operations, self._seq + 1, self.family)
            self._seq = last + 1
            self._sock.send(data)
            self._wait_acks(first, last)
            try:  # the generation it made, asked at once (a commit meanwhile breaks the chain)
                self._seq += 1
                OWN_COMMITS.committed({name for _, by_set, _ in operations for name in by_set},
                                      _generation(self._sock, self._seq))
            except OSError:
                pass

    def _wait_acks(self, first: int, last: int) -> None:
        pending = set(range(first, last + 1))
        failure = None
        while pending:
            data = self._sock.recv(65536)
            for kind, seq, at in messages(data):
                if kind == NLMSG_ERROR:
                    pending.discard(seq)
                    failure = failure or error_code(data, at)
        if failure:
            raise OSError(failure, f"nftables set update: {os.strerror(failure)}")

    @staticmethod
    def _group(addresses) -> dict[str, list]:
        by_set: dict[str, list] = {}
        for address in addresses:
            item = address
            if isinstance(address, tuple):  # (address, seconds[, (packets, bytes)])
                ip = canonical(address[0])
                item = (ip, int(address[1] * 1000) or None, *address[2:])
            else:
                ip = item = canonical(address)
            by_set.setdefault("ban4" if ip.version == 4 else "ban6", []).append(item)
        return by_set

    def add_each(self, pairs) -> None:
        """Add (address, timeout seconds) pairs, each with its own timeout (0 = none);
        a third item (packets, bytes), if any, is where its counter starts."""
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

    def delete_keys(self, set_name: str, keys: list[bytes]) -> None:
        """Delete raw keys from one set (no address canonicalisation)."""
        self._commit([(NFT_MSG_DELSETELEM, {set_name: keys}, None)])

    def refresh_ports(self, set_name: str, ports, timeout: float) -> None:
        """Put ports in an inet_service set with a fresh timeout."""
        self.refresh_keys(set_name, [struct.pack("!H", p) for p in sorted(ports)], timeout)

    def refresh_keys(self, set_name: str, keys: list[bytes], timeout: float) -> None:
        """Put raw keys in a set with a fresh timeout (add, delete, add: a
        plain add would keep an existing element's old timeout)."""
        for start in range(0, len(keys), CHUNK):
            chunk = {set_name: keys[start:start + CHUNK]}
            self._commit([(NFT_MSG_NEWSETELEM, chunk, None), (NFT_MSG_DELSETELEM, chunk, None),
                          (NFT_MSG_NEWSETELEM, chunk, int(timeout * 1000) or None)])

    def add_keys(self, by_set: dict[str, list[bytes]], timeout: float) -> None:
        """Add raw keys to sets (existing ones left as they are), CHUNK a message."""
        for name, keys in by_set.items():
            for start in range(0, len(keys), CHUNK):
                self._commit([(NFT_MSG_NEWSETELEM, {name: keys[start:start + CHUNK]},
                               int(timeout * 1000) or None)])

    def contains(self, set_name: str, address) -> bool:
        """One GETSETELEM round trip: is `address` in the set?"""
        body = elements_body(self.table, set_name, [ipaddress.ip_address(address)], None)
        with self._lock:
            self._seq += 1
            self._sock.send(nfnl_message(NFNL_SUBSYS_NFTABLES, NFT_MSG_GETSETELEM,
                                         NLM_F_REQUEST | NLM_F_ACK, self._seq, NFPROTO_INET, body))
            return bool(answers(self._sock, self._seq, "nftables get element"))

    def counted(self, set_name: str, address) -> tuple[int, int] | None:
        """One GETSETELEM round trip: (packets, bytes) of the element's
        counter; None when it is not in the set or has no counter."""
        body = elements_body(self.table, set_name, [ipaddress.ip_address(address)], None)
        with self._lock:
            self._seq += 1
            self._sock.send(nfnl_message(NFNL_SUBSYS_NFTABLES, NFT_MSG_GETSETELEM,
                                         NLM_F_REQUEST | NLM_F_ACK, self._seq, self.family, body))
            found: list = []
            for data, at, end in answers(self._sock, self._seq, "nftables get element"):
                _elements_into(found, data, at + NFGEN.size, end, counted=True)
        return next((counter for _, _, counter in found if counter), None)

    def replace(self, addresses, timeout: float = 0) -> None:
        """Set the timeout of addresses whether or not they are in the set yet:
        add (if missing), delete, add with the timeout, in one transaction.
        Each keeps what its counter counted (the delete would zero it)."""
        addresses = list(addresses)
        for start in range(0, len(addresses), CHUNK):
            by_set = self._group(addresses[start:start + CHUNK])
            if by_set:
                ms = int(timeout * 1000) or None
                again = {name: [(ip, ms, self.counted(name, ip)) for ip in ips]
                         for name, ips in by_set.items()}
                self._commit([(NFT_MSG_NEWSETELEM, by_set, None),
                              (NFT_MSG_DELSETELEM, by_set, None),
                              (NFT_MSG_NEWSETELEM, again, None)])


NFT_MSG_GETGEN, NFTA_GEN_ID = 16, 1


def generation() -> int:
    """nf_tables' ruleset generation in this network namespace: every
    committed change moves it (not the kernel's own set updates from packets,
    nor timeouts). One round trip of a few microseconds."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        return _generation(sock, 1)
    finally:
        sock.close()


def _generation(sock: socket.socket, seq: int) -> int:
    sock.send(nfnl_message(NFNL_SUBSYS_NFTABLES, NFT_MSG_GETGEN, NLM_F_REQUEST | NLM_F_ACK,
                           seq, socket.AF_UNSPEC, b""))
    for data, start, end in answers(sock, seq, "nftables generation"):
        found = attributes(data, start + NFGEN.size, end).get(NFTA_GEN_ID)
        if found is not None and len(found) == 4:
            return struct.unpack("!I", found)[0]
    raise OSError("nftables generation: no answer")


def dump_set(table: str, set_name: str) -> dict[str, float | None]:
    """Every element of one address set: address -> seconds left (None: no
    timeout). Its own socket, so a long dump never holds up the ban path."""
    found: dict[str, float | None] = {}
    for key, left in _dump(table, set_name):
        if len(key) in (4, 16):
            found[str(ipaddress.ip_address(key))] = left
    return found


def dump_counted(table: str, set_name: str, family: int = NFPROTO_INET
                 ) -> dict[str, tuple[float | None, int | None, int | None]]:
    """Every element of one address set: address -> (seconds left, packets
    and bytes its counter saw; None for a set without counters)."""
    found: dict[str, tuple[float | None, int | None, int | None]] = {}
    for key, left, counter in _dump(table, set_name, counted=True, family=family):
        if len(key) in (4, 16):
            found[str(ipaddress.ip_address(key))] = (left, *(counter or (None, None)))
    return found


def dump_keys(table: str, set_name: str) -> list[bytes]:
    """The raw keys of one set's elements (a concatenation's too)."""
    return [key for key, _ in _dump(table, set_name)]


def _dump(table: str, set_name: str, counted: bool = False,
          family: int = NFPROTO_INET) -> list[tuple]:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        body = (attr(SET_ELEM_LIST_TABLE, table.encode() + b"\0")
                + attr(SET_ELEM_LIST_SET, set_name.encode() + b"\0"))
        sock.send(nfnl_message(NFNL_SUBSYS_NFTABLES, NFT_MSG_GETSETELEM,
                               NLM_F_REQUEST | NLM_F_DUMP, 1, family, body))
        found: list[tuple] = []
        while True:
            data = sock.recv(1 << 20)
            for kind, _, at in messages(data):
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    code = error_code(data, at)
                    raise OSError(code, f"nftables set {set_name}: {os.strerror(code)}")
                _elements_into(found, data, at + NFGEN.size, message_end(data, at), counted)
    finally:
        sock.close()


def _elements_into(found: list, data: bytes, start: int, end: int,
                   counted: bool = False) -> None:
    """(key, seconds left) of each element, and with `counted` its counter's
    (packets, bytes) or None."""
    listed = attributes(data, start, end).get(SET_ELEM_LIST_ELEMENTS, b"")
    for payload in _each_nested(listed):
        element = attributes(payload, 0, len(payload))
        key = attributes(element.get(SET_ELEM_KEY, b""), 0, 64).get(DATA_VALUE)
        if key is not None:
            expires = element.get(SET_ELEM_EXPIRATION)
            left = struct.unpack("!Q", expires)[0] / 1000 if expires else None
            found.append((key, left, _counter(element)) if counted else (key, left))


def _each_nested(listed: bytes):
    """The payloads of a list of same-type nested attributes (NFTA_LIST_ELEM):
    `attributes` keeps one per type, a list repeats it."""
    at = 0
    while at + 4 <= len(listed):
        length = struct.unpack_from("=H", listed, at)[0]
        if length < 4:
            break
        yield listed[at + 4:at + length]
        at += (length + 3) & ~3


def _counter(element: dict[int, bytes]) -> tuple[int, int] | None:
    """(packets, bytes) of an element's counter, if it has one."""
    exprs = [element[SET_ELEM_EXPR]] if SET_ELEM_EXPR in element else []
    exprs += _each_nested(element.get(SET_ELEM_EXPRESSIONS, b""))
    for expr in exprs:
        fields = attributes(expr, 0, len(expr))
        if fields.get(EXPR_NAME, b"").rstrip(b"\0") == b"counter":
            data = attributes(fields.get(EXPR_DATA, b""), 0, 64)
            packets, octets = data.get(COUNTER_PACKETS), data.get(COUNTER_BYTES, bytes(8))
            if packets is not None and len(packets) == len(octets) == 8:
                return struct.unpack("!Q", packets)[0], struct.unpack("!Q", octets)[0]
    return None



# -- the queue statement as the xtables NFQUEUE target (nft_compat) ---------------
NFT_MSG_NEWRULE = 6
RULE_TABLE, RULE_CHAIN, RULE_EXPRESSIONS = 1, 2, 4
TARGET_NAME, TARGET_REV, TARGET_INFO = 1, 2, 3
NFQ_FLAG_BYPASS = 0x01


def compat_queue_rule(table: str, chain: str, queue: int, seq: int = 1) -> bytes:
    """A transaction adding `NFQUEUE --queue-num <queue> --queue-bypass` (the
    xtables target, revision 3) as the one rule of `chain`: for kernels
    without nftables' own queue expression (CONFIG_NFT_QUEUE), which still
    have nft_compat and xt_NFQUEUE."""
    info = struct.pack("=HHH", queue, 1, NFQ_FLAG_BYPASS) + b"\0\0"  # XT_ALIGN(6) = 8
    target = nested(1, attr(EXPR_NAME, b"target\0"), nested(
        EXPR_DATA, attr(TARGET_NAME, b"NFQUEUE\0"), attr(TARGET_REV, struct.pack("!I", 3)),
        attr(TARGET_INFO, info)))
    body = (attr(RULE_TABLE, table.encode() + b"\0") + attr(RULE_CHAIN, chain.encode() + b"\0")
            + nested(RULE_EXPRESSIONS, target))
    return b"".join([
        _edge(NFNL_MSG_BATCH_BEGIN, seq),
        nfnl_message(NFNL_SUBSYS_NFTABLES, NFT_MSG_NEWRULE,
                     NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND, seq + 1,
                     NFPROTO_INET, body),
        _edge(NFNL_MSG_BATCH_END, seq + 2)])


def add_compat_queue_rule(table: str, chain: str, queue: int) -> None:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        sock.send(compat_queue_rule(table, chain, queue))
        answers(sock, 2, "nftables queue rule (xtables NFQUEUE)")
    finally:
        sock.close()

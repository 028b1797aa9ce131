"""A netfilter queue (nfnetlink_queue), hand-encoded like the rest of our
netlink: bind a queue, read the packets the kernel holds there (id, arrival,
source address), and hand them back with one verdict for every packet up to
an id (a batch verdict: the queue is first in, first out).

Set up to fail open: the rule that queues carries `bypass` (no reader bound:
the packet passes), and the queue `fail-open` (full, or a message the kernel
cannot deliver to us: the packet passes; its id is skipped, so we count it)."""

from __future__ import annotations

import errno
import socket
import struct

from .netlink import (NETLINK_NETFILTER, NLM_F_ACK, NLM_F_REQUEST, answers, attr, attributes,
                      message_end, messages, nfnl_message, receive_buffer)

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 2, 3
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND = 1, 2
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_FAIL_OPEN = 1
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_PAYLOAD = 1, 2, 10
NF_ACCEPT, NF_REPEAT = 1, 4
COPY_RANGE = 40  # an IPv6 header; the IPv4 source is within its first 20 bytes
MAXLEN = 8192  # packets held at once before the kernel lets more pass unheld


def config_message(queue: int, seq: int, body: bytes) -> bytes:
    return nfnl_message(NFNL_SUBSYS_QUEUE, NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq,
                        socket.AF_UNSPEC, body, queue)


def bind_messages(queue: int) -> list[bytes]:
    """Bind, copy 40 bytes of each packet, hold up to MAXLEN, fail open."""
    return [
        config_message(queue, 1, attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0))),
        config_message(queue, 2, attr(NFQA_CFG_PARAMS, struct.pack("!IB", COPY_RANGE,
                                                                   NFQNL_COPY_PACKET))
                       + attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", MAXLEN))
                       + attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))
                       + attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))),
    ]


def verdict_message(queue: int, verdict: int, last_id: int, seq: int = 0) -> bytes:
    """`verdict` for every packet held with an id up to `last_id`."""
    return nfnl_message(NFNL_SUBSYS_QUEUE, NFQNL_MSG_VERDICT_BATCH, NLM_F_REQUEST, seq,
                        socket.AF_UNSPEC, attr(NFQA_VERDICT_HDR,
                                               struct.pack("!II", verdict, last_id)), queue)


def source_of(payload: bytes) -> bytes | None:
    """The packed source address of an IP packet's first bytes."""
    if payload[:1] and payload[0] >> 4 == 4 and len(payload) >= 16:
        return payload[12:16]
    if payload[:1] and payload[0] >> 4 == 6 and len(payload) >= 24:
        return payload[8:24]
    return None


def packets(data: bytes):
    """(packet id, packed source or None) of each queued packet in a datagram."""
    for kind, _, at in messages(data):
        if kind & 0xFF != NFQNL_MSG_PACKET or kind >> 8 != NFNL_SUBSYS_QUEUE:
            continue
        found = attributes(data, at + 4, message_end(data, at))
        header = found.get(NFQA_PACKET_HDR)
        if header is None or len(header) < 4:
            continue
        yield struct.unpack_from("!I", header)[0], source_of(found.get(NFQA_PAYLOAD, b""))


class Queue:
    """One bound netfilter queue."""

    def __init__(self, number: int):
        self.number = number
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.bind((0, 0))
            receive_buffer(self.sock, 1 << 22)
            for seq, request in enumerate(bind_messages(number), 1):
                self.sock.send(request)
                answers(self.sock, seq, f"netfilter queue {number}")
        except OSError:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> list[tuple[int, bytes | None]]:
        """The packets waiting now (non-blocking); ENOBUFS (messages the kernel
        could not deliver, so it let those packets pass) is no error here:
        the skipped ids tell how many."""
        found = []
        while True:
            try:
                data = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return found
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    continue
                raise
            found.extend(packets(data))

    def verdict(self, verdict: int, last_id: int) -> None:
        self.sock.send(verdict_message(self.number, verdict, last_id))

    def close(self) -> None:
        try:
            self.sock.send(config_message(self.number, 3, attr(
                NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_UNBIND, 0))))
        except OSError:
            pass
        self.sock.close()

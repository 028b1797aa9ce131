"""Notice at once when another program deletes from our nftables table.

`nft flush ruleset` (an nftables.service restart, a firewall manager) removes
our table, its ban sets and the kernel trap; `nft flush set ... trap_tcp` or
a rule inserted into our chains disarms it more quietly. nf_tables announces
every change on a netlink multicast group; this socket listens for changes to
our table (deleted table, chains, sets; rules added or deleted; elements of the
trap-port and never-block sets deleted), so the daemon can check and restore
it within a second. Our own re-installs cause such events too: they only lead
to a check that finds all in place.

A socket filter drops, in the kernel, every event datagram that begins with
an element added (a ban, the hold's clear sets) or a new
generation: at thousands of bans a second, reading them back cost the daemon
a seventh of its packet thread. (A datagram that begins so and deletes
something of ours further on is left to the reconciliation every 30 s.)
"""

from __future__ import annotations

import socket
import struct

from . import bpf
from .netlink import (NETLINK_NETFILTER, NFGEN, attributes, message_end, messages,
                      receive_buffer)
from . import nfnetlink
from .nfnetlink import NFNL_SUBSYS_NFTABLES, NFPROTO_INET

NFNLGRP_NFTABLES = 7
NFT_MSG_DELTABLE, NFT_MSG_DELCHAIN, NFT_MSG_NEWRULE, NFT_MSG_DELRULE = 2, 5, 6, 8
NFT_MSG_DELSET, NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM, NFT_MSG_NEWGEN = 11, 12, 14, 15
CHANGES = {NFT_MSG_DELTABLE, NFT_MSG_DELCHAIN, NFT_MSG_NEWRULE, NFT_MSG_DELRULE,
           NFT_MSG_DELSET, NFT_MSG_DELSETELEM}
TABLE_ATTRIBUTE, SET_ATTRIBUTE = 1, 2  # NFTA_*_TABLE alike; NFTA_SET_ELEM_LIST_SET
STATIC_SETS = {n.encode() for n in nfnetlink.STATIC_SETS}  # bans come and go: not these


def event_filter() -> list[bpf.Insn]:
    """Drop a datagram whose first message is NEWSETELEM or NEWGEN."""
    def as_loaded(kind: int) -> int:  # nlmsg_type is host order; BPF loads big endian
        return struct.unpack("!H", struct.pack("=H", (NFNL_SUBSYS_NFTABLES << 8) | kind))[0]
    return [(bpf.LD_H_ABS, 0, 0, 4),
            (bpf.JEQ, 2, 0, as_loaded(NFT_MSG_NEWSETELEM)),
            (bpf.JEQ, 1, 0, as_loaded(NFT_MSG_NEWGEN)),
            (bpf.RET_K, 0, 0, 0xFFFFFFFF),
            (bpf.RET_K, 0, 0, 0)]


class RulesetWatch:
    def __init__(self, table: str):
        self.table = table.encode()
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
            receive_buffer(self.sock, 1 << 20)
            self.sock.setblocking(False)
            bpf.attach(self.sock, event_filter())
        except BaseException:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def touched(self) -> bool:
        """Drain the events; True if any deleted something of our table (or
        events were lost: then assume so)."""
        touched = False
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return touched
            except OSError:  # ENOBUFS: events were dropped, so check
                touched = True
                continue
            for kind, _, at in messages(data):
                if kind >> 8 != NFNL_SUBSYS_NFTABLES or kind & 0xFF not in CHANGES:
                    continue
                if data[at] != NFPROTO_INET:
                    continue
                found = attributes(data, at + NFGEN.size, message_end(data, at))
                name = found.get(TABLE_ATTRIBUTE)
                if name is None or name.rstrip(b"\0") != self.table:
                    continue
                if kind & 0xFF == NFT_MSG_DELSETELEM and \
                        found.get(SET_ATTRIBUTE, b"").rstrip(b"\0") not in STATIC_SETS:
                    continue  # a ban lifted or expired
                touched = True

"""Notice at once when another program deletes from our nftables table.

`nft flush ruleset` (an nftables.service restart, a firewall manager) removes
our table, its ban sets and the kernel trap. nf_tables announces every change
on a netlink multicast group; this socket listens for deletions of our
table, its chains, rules and sets, so the daemon can check and restore them
within a second instead of at the next reconciliation. Our own re-installs
cause such events too: they only lead to a check that finds all in place.
"""

from __future__ import annotations

import socket
import struct

from .nfnetlink import NETLINK_NETFILTER, NFNL_SUBSYS_NFTABLES, NFPROTO_INET, _NFGEN, \
    attributes, netlink_messages

NFNLGRP_NFTABLES = 7
NFT_MSG_DELTABLE, NFT_MSG_DELCHAIN, NFT_MSG_DELRULE, NFT_MSG_DELSET = 2, 5, 8, 11
DELETIONS = {NFT_MSG_DELTABLE, NFT_MSG_DELCHAIN, NFT_MSG_DELRULE, NFT_MSG_DELSET}
TABLE_ATTRIBUTE = 1  # NFTA_{TABLE_NAME,CHAIN_TABLE,RULE_TABLE,SET_TABLE} alike


class RulesetWatch:
    def __init__(self, table: str):
        self.table = table.encode()
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self.sock.setblocking(False)
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
            for kind, _, at in netlink_messages(data):
                if kind >> 8 != NFNL_SUBSYS_NFTABLES or kind & 0xFF not in DELETIONS:
                    continue
                if data[at] != NFPROTO_INET:
                    continue
                length = struct.unpack_from("=I", data, at - 16)[0]
                name = attributes(data, at + _NFGEN.size, at - 16 + length).get(TABLE_ATTRIBUTE)
                if name is not None and name.rstrip(b"\0") == self.table:
                    touched = True

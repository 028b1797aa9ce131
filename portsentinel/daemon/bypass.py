"""Ban effectiveness past the IP hooks (issue 14): bridges that forward a
banned source's packets anyway are found, their table of counting copies
of the ban sets follows each ban and lift (the ledger's) and is checked
against ours at each reconciliation, and a banned source whose packets went
through is warned about (bridges.py)."""

from __future__ import annotations

import time

from .. import bridges
from ..nfnetlink import NFPROTO_BRIDGE, SetElements, dump_counted
from ..nft import NftError
from ..ruleset import bridge_commands
from .context import Context

WARN_AGAIN = 3600.0  # s: a source still getting through is warned about again after this
WARN_LINES = 10  # sources with a line of their own each check (the rest are counted)


class BypassWatch:
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.find = bridges.bypassing  # (a test's own bridges)
        self.bridges: list[bridges.Bridge] = []  # as last found
        self.through: dict[str, int] = {}  # banned source -> packets counted going through
        self._installed = False  # our bridge table made (or found) since the last removal
        self._said: set[str] = set()  # bridges warned about
        self._warned: dict[str, tuple[float, int]] = {}  # source -> (when, packets then)
        self._elements: SetElements | None = None

    def check(self, kernel: dict[str, float | None]) -> None:
        """Worker, at reconciliation, with our ban sets as just dumped
        (address -> seconds left)."""
        table = self.ctx.config.nft_table
        self.bridges = self.find()
        if not self.bridges:
            if self._installed:
                self._remove(table)
            return
        for bridge in self.bridges:
            if bridge.name not in self._said:
                self._said.add(bridge.name)
                self.ctx.log.error(
                    f"adminalert: WARNING: bridge {bridge.describe()} forwards traffic past "
                    "the IP firewall (br_netfilter not loaded, or bridge-nf-call-iptables / "
                    "-ip6tables is 0): banned sources still reach the hosts behind it; "
                    "counting what gets through")
        try:
            self._sync(table, kernel)
        except (NftError, OSError) as err:
            self.ctx.report_error(f"bridge ban copies: {err}")

    def copy(self, address: str, seconds: float | None) -> None:
        """Worker, as a ban is made: its copy at once (its packets through a
        bridge counted from the start, not from the next reconciliation)."""
        if self._installed:
            try:
                self._elements.add_each([(address, seconds or 0)])
            except OSError:
                pass  # the next reconciliation makes it
        self._warned.pop(address, None)

    def uncopy(self, address: str) -> None:
        """Worker, as a ban is lifted: what it sends from now on is not a ban's."""
        if self._installed:
            try:
                self._elements.delete([address])
            except OSError:
                pass  # gone already, or the next reconciliation removes it
        self.through.pop(address, None)
        self._warned.pop(address, None)

    def _sync(self, table: str, kernel: dict[str, float | None]) -> None:
        # made each time (a transaction, only while a bridge bypasses): an emptied
        # chain counts nothing, and nothing else would tell
        self.ctx.bans.nft.run("\n".join(bridge_commands(table, self.ctx.bans.set_size)) + "\n")
        self._installed = True
        if self._elements is None:
            self._elements = SetElements(table, NFPROTO_BRIDGE)
        copies = self._copies(table)
        missing = [(a, left or 0) for a, left in kernel.items() if a not in copies]
        extra = [a for a in copies if a not in kernel]
        if missing:
            self._elements.add_each(missing)
        if extra:
            self._elements.delete(extra)
        self.through = {a: n for a, (_, n, _) in copies.items() if n and a in kernel}
        self.ctx.metrics.bypassed.set(sum(self.through.values()))
        self._warn(time.time())

    @staticmethod
    def _copies(table: str) -> dict[str, tuple[float | None, int | None, int | None]]:
        copies = {}
        for name in ("ban4", "ban6"):
            copies.update(dump_counted(table, name, NFPROTO_BRIDGE))
        return copies

    def _warn(self, now: float) -> None:
        fresh = [(a, n) for a, n in sorted(self.through.items())
                 if a not in self._warned or (n > self._warned[a][1]
                                              and now - self._warned[a][0] >= WARN_AGAIN)]
        names = ", ".join(b.name for b in self.bridges)
        for address, packets in fresh[:WARN_LINES]:
            self.ctx.log.error(f"adminalert: WARNING: banned host {address} still gets through "
                               f"bridge {names}: {packets} packets forwarded past the ban")
        if len(fresh) > WARN_LINES:
            self.ctx.log.error(f"adminalert: WARNING: and {len(fresh) - WARN_LINES} more banned "
                               f"hosts get through bridge {names}")
        for address, packets in fresh:
            self._warned[address] = (now, packets)
        for address in [a for a in self._warned if a not in self.through]:
            del self._warned[address]

    def _remove(self, table: str) -> None:
        try:
            self.ctx.bans.nft.run(f"delete table bridge {table}\n")
        except NftError:
            pass  # gone already
        self._installed, self.through = False, {}
        self.ctx.metrics.bypassed.set(0)

    def status(self) -> dict:
        return {"bridges": [b.describe() for b in self.bridges],
                "bans_getting_through": dict(sorted(self.through.items()))}

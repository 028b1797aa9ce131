"""Bridges whose traffic our bans never see, and what gets through them.

The bans drop in the IP prerouting hook. A frame a Linux bridge forwards
from one port to another (to a VM or container bridged to the host's
network) passes that hook only when br_netfilter hands bridged IP traffic to
the IP hooks (`bridge-nf-call-iptables`, `-ip6tables`, or the bridge's own
`nf_call_iptables`). Without it, a banned source still reaches the hosts
behind the bridge. For such bridges a `bridge <table>` table (ruleset's
`bridge_commands`) holds a copy of the ban sets with counters, in the
bridge's forward hook, counting, not dropping: the daemon warns when a
banned source's packets go through.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FAMILIES = (("ipv4", "iptables"), ("ipv6", "ip6tables"))


@dataclass(frozen=True)
class Bridge:
    name: str
    ports: tuple[str, ...]
    bypassed: tuple[str, ...]  # "ipv4", "ipv6": forwarded past the IP hooks

    def describe(self) -> str:
        families = " and ".join(f.replace("ip", "IP") for f in self.bypassed)
        return f"{self.name} (ports {', '.join(self.ports)}; {families})"


def _flag(path: Path) -> bool:
    try:
        return path.read_text().strip() == "1"
    except OSError:  # not there: br_netfilter not loaded
        return False


def bypassing(sys_net: str = "/sys/class/net",
              proc_bridge: str = "/proc/sys/net/bridge") -> list[Bridge]:
    """The bridges with ports that forward IPv4 or IPv6 past the IP hooks."""
    found = []
    for bridge in sorted(Path(sys_net).glob("*/bridge")):
        device = bridge.parent
        ports = tuple(sorted(p.name for p in (device / "brif").glob("*")))
        if not ports:
            continue
        loaded = Path(proc_bridge).is_dir()  # br_netfilter's own switches
        bypassed = tuple(family for family, tool in FAMILIES
                         if not loaded or not (_flag(Path(proc_bridge, f"bridge-nf-call-{tool}"))
                                               or _flag(bridge / f"nf_call_{tool}")))
        if bypassed:
            found.append(Bridge(device.name, ports, bypassed))
    return found

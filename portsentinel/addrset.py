"""An immutable set of IPv4/IPv6 networks with O(log n) membership tests.

Networks are merged into sorted, disjoint integer ranges per family, so a
lookup is one bisect, whatever the number of entries.
"""

from __future__ import annotations

import bisect
import ipaddress
import socket
from typing import Iterable

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def canonical(address) -> Address:
    """One address, one form: an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`)
    is the IPv4 address, everywhere (engine, sets, state, CLI, fleet); a
    scope (`%eth0`) is not part of the address. Raises ValueError."""
    if isinstance(address, str):
        if "\n" in address or "\r" in address:
            raise ValueError(f"{address!r} is not an IP address")
        address = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id is not None:
            return ipaddress.IPv6Address(address.packed)
    return address


def text(address: Address) -> str:
    """`str(address)`, about 50x faster for IPv6 (inet_ntop), the same text:
    what inet_ntop writes differently (the deprecated ::a.b.c.d forms) is
    left to ipaddress."""
    if address.version == 4:
        return str(address)
    packed = address.packed
    if packed[:10] == bytes(10) and packed[10:12] in (b"\0\0", b"\xff\xff"):
        return str(address)
    return socket.inet_ntop(socket.AF_INET6, packed)


def from_stored(text: str) -> Address:
    """An address we stored ourselves (canonical text), parsed about 9x faster
    than `ipaddress.ip_address` (100,000 bans at start-up); anything else
    goes through `canonical`."""
    try:
        if ":" in text:
            address = ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, text))
            return address if address.ipv4_mapped is None else address.ipv4_mapped
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except (OSError, ValueError, TypeError):
        return canonical(text)


def canonical_network(text: str) -> Network:
    """A CIDR (or one address) with IPv4-mapped IPv6 forms turned into IPv4."""
    network = ipaddress.ip_network(text.split("%", 1)[0] if "/" not in text else text,
                                   strict=False)
    if (isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96
            and network.network_address.ipv4_mapped is not None):
        return ipaddress.IPv4Network((network.network_address.ipv4_mapped,
                                      network.prefixlen - 96))
    return network


def _merged(ranges: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    starts: list[int] = []
    ends: list[int] = []
    for start, end in sorted(ranges):
        if ends and start <= ends[-1] + 1:
            ends[-1] = max(ends[-1], end)
        else:
            starts.append(start)
            ends.append(end)
    return starts, ends


class AddressSet:
    """Networks of both families; `address in s` is a bisect per lookup."""

    __slots__ = ("_networks", "_ranges")

    def __init__(self, networks: Iterable[Network | Address | str] = ()):
        nets = {_as_network(n) for n in networks}
        self._networks = frozenset(nets)
        by_family: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for net in nets:
            by_family[net.version].append(
                (int(net.network_address), int(net.broadcast_address))
            )
        self._ranges = {v: _merged(r) for v, r in by_family.items()}

    def __contains__(self, address: Address | str) -> bool:
        if isinstance(address, str):
            address = ipaddress.ip_address(address)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            # ::ffff:a.b.c.d is the IPv4 host a.b.c.d: either form may be listed
            return self._has(address.ipv4_mapped) or self._has(address)
        return self._has(address)

    def _has(self, address: Address) -> bool:
        starts, ends = self._ranges[address.version]
        value = int(address)
        i = bisect.bisect_right(starts, value) - 1
        return i >= 0 and value <= ends[i]

    def ranges(self, version: int) -> list[tuple[int, int]]:
        """Merged, sorted, disjoint (first, last) integer ranges of one family."""
        starts, ends = self._ranges[version]
        return list(zip(starts, ends, strict=True))

    def __len__(self) -> int:
        return len(self._networks)

    def __iter__(self):
        return iter(sorted(self._networks, key=lambda n: (n.version, n)))

    def __or__(self, other: "AddressSet") -> "AddressSet":
        return AddressSet(self._networks | other._networks)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AddressSet) and self._networks == other._networks

    def __repr__(self) -> str:
        return f"AddressSet({[str(n) for n in self]})"


def _as_network(value: Network | Address | str) -> Network:
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return value
    return ipaddress.ip_network(value, strict=False)

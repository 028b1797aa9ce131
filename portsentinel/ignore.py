"""Ignore files (`portsentry.ignore`, `portsentry.ignore.static`), the
host's own addresses, its default gateways and DNS resolvers: together, the
addresses that are never blocked (so spoofed probes cannot cut the host off).

An entry is an IPv4/IPv6 address or CIDR, optionally followed by a comment;
leading spaces are fine and `/0` means everything (both 1.2 bugs fixed).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from . import rtnetlink
from .addrset import AddressSet, Network
from .config import ConfigError

ALWAYS = ("127.0.0.0/8", "::1/128", "0.0.0.0/32", "::/128")


def parse_entry(text: str) -> Network:
    """One entry: `192.0.2.1`, `192.0.2.0/24`, `2001:db8::/32`, `0.0.0.0/0`."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        pass
    address, _, bits = text.partition("/")
    if bits and "." in bits:  # 1.2-era netmask form: 192.168.0.0/255.255.0.0
        try:
            return ipaddress.ip_network(f"{address}/{bits}", strict=False)
        except ValueError:
            pass
    raise ValueError(f"{text!r} is not an IP address or CIDR network")


def parse_ignore(text: str, source: str) -> list[Network]:
    networks = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        first, *rest = entry.split()
        if rest:
            raise ConfigError(f"one address or network per line, found {entry!r}", source, number)
        try:
            networks.append(parse_entry(first))
        except ValueError as err:
            raise ConfigError(str(err), source, number) from None
    return networks


def ignore_paths(ignore_file: Path | None) -> list[Path]:
    """The ignore file and its `.static` companion (Debian builds one from the other)."""
    if ignore_file is None:
        return []
    return [ignore_file, ignore_file.with_name(ignore_file.name + ".static")]


def read_ignore_files(ignore_file: Path | None,
                      where: tuple[str, int | None] = ("", None)) -> list[Network]:
    """Entries of IGNORE_FILE and IGNORE_FILE.static; at least one must exist.

    `where` is the config file:line that named IGNORE_FILE, for the error.
    """
    paths = ignore_paths(ignore_file)
    found = [p for p in paths if p.exists()]
    if paths and not found:
        raise ConfigError(f"IGNORE_FILE {ignore_file} not found (nor {paths[1].name})",
                          where[0] or str(ignore_file), where[1])
    networks = []
    for path in found:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read ignore file: {err}", str(path)) from None
        networks += parse_ignore(text, str(path))
    return networks


@dataclass(frozen=True)
class IgnoreFilesStamp:
    """What the ignore files looked like, to notice edits cheaply."""

    stamps: tuple[tuple[str, int, int], ...]

    @classmethod
    def of(cls, ignore_file: Path | None) -> "IgnoreFilesStamp":
        stamps = []
        for path in [*ignore_paths(ignore_file), RESOLV_CONF]:
            try:
                st = path.stat()
                stamps.append((str(path), st.st_mtime_ns, st.st_size))
            except OSError:
                stamps.append((str(path), -1, -1))
        return cls(tuple(stamps))


def local_addresses() -> list[Network]:
    """Every address configured on this host's interfaces (this netns)."""
    return rtnetlink.addresses()


RESOLV_CONF = Path("/etc/resolv.conf")


def gateway_addresses() -> list[Network]:
    """The next hops of the default routes (IPv4 and IPv6, multipath too)."""
    return rtnetlink.default_gateways()


def resolver_addresses(path: Path = RESOLV_CONF) -> list[Network]:
    """`nameserver` lines of resolv.conf; unreadable or odd lines are skipped."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                found.append(ipaddress.ip_network(fields[1].split("%")[0]))
            except ValueError:
                continue
    return found


def never_block_set(ignore_file: Path | None, host_addresses: list[Network],
                    where: tuple[str, int | None] = ("", None)) -> AddressSet:
    return AddressSet([*ALWAYS, *host_addresses, *read_ignore_files(ignore_file, where)])

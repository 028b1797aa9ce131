import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from portsentinel.addrset import AddressSet
from portsentinel.config import ConfigError
from portsentinel.ignore import never_block_set, parse_ignore, read_ignore_files

DEBIAN_STATIC = """\
# /etc/portsentry/portsentry.ignore.static
#
# 192.168.2.0/24
127.0.0.1/32
0.0.0.0
"""


def test_debian_static_file():
    nets = parse_ignore(DEBIAN_STATIC, "static")
    assert nets == [ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("0.0.0.0/32")]


def test_leading_spaces_comments_ipv6_and_slash_zero():
    nets = parse_ignore("   198.51.100.0/24   # lab\n\t2001:db8::/64\n::/0\n", "f")
    s = AddressSet(nets)
    assert "198.51.100.77" in s and "2001:db9::1" in s  # ::/0 covers all IPv6
    assert "192.0.2.1" not in s


def test_zero_slash_zero_covers_everything_ipv4():
    assert "203.0.113.9" in AddressSet(parse_ignore("0.0.0.0/0", "f"))


def test_netmask_form():
    assert parse_ignore("192.168.0.0/255.255.0.0", "f") == [ipaddress.ip_network("192.168.0.0/16")]


@pytest.mark.parametrize("line", ["300.1.1.1", "banana", "1.2.3.4 5.6.7.8", "10.0.0.0/33"])
def test_bad_entries_name_file_and_line(line):
    with pytest.raises(ConfigError, match=r"^ign:2: "):
        parse_ignore(f"# header\n{line}\n", "ign")


def test_ignore_file_and_static_are_merged(tmp_path: Path):
    base = tmp_path / "portsentry.ignore"
    base.write_text("198.51.100.3\n")
    (tmp_path / "portsentry.ignore.static").write_text("2001:db8::3\n")
    s = never_block_set(base, [ipaddress.ip_network("198.51.100.1/32")])
    assert {"198.51.100.3", "2001:db8::3", "198.51.100.1", "127.0.0.1", "::1"} <= {
        a for a in ("198.51.100.3", "2001:db8::3", "198.51.100.1", "127.0.0.1", "::1") if a in s}
    assert "198.51.100.2" not in s


def test_only_static_present_is_enough(tmp_path: Path):
    (tmp_path / "portsentry.ignore.static").write_text("198.51.100.3\n")
    assert read_ignore_files(tmp_path / "portsentry.ignore") == [
        ipaddress.ip_network("198.51.100.3/32")]


def test_missing_ignore_files_is_an_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        read_ignore_files(tmp_path / "portsentry.ignore", ("portsentry.conf", 86))


def test_no_ignore_file_configured_means_builtins_only():
    s = never_block_set(None, [])
    assert "127.0.0.1" in s and "::1" in s and "198.51.100.2" not in s


def test_ipv4_mapped_lookup():
    assert "::ffff:198.51.100.3" in AddressSet(["198.51.100.0/24"])


networks = st.one_of(
    st.builds(lambda a, p: ipaddress.IPv4Network((a, p), strict=False),
              st.integers(0, 2**32 - 1), st.integers(0, 32)),
    st.builds(lambda a, p: ipaddress.IPv6Network((a, p), strict=False),
              st.integers(0, 2**128 - 1), st.integers(0, 128)))
addresses = st.one_of(st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1)),
                      st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1)))


@settings(max_examples=400, deadline=None)
@given(st.lists(networks, max_size=20), st.lists(addresses, max_size=20))
def test_address_set_agrees_with_naive_lookup(nets, probes):
    s = AddressSet(nets)
    for address in probes + [n.network_address for n in nets] + [n.broadcast_address for n in nets]:
        expected = any(address.version == n.version and address in n for n in nets)
        assert (address in s) == expected


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_ignore_text_gives_entries_or_a_clear_error(text):
    try:
        parse_ignore(text, "fuzz.ignore")
    except ConfigError as err:
        assert str(err).startswith("fuzz.ignore:")

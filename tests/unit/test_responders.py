"""KILL_ROUTE and address families; undo of the command really run."""

import io
from pathlib import Path

import pytest

from portsentinel import logs
from portsentinel.command_templates import command_family, kill_route_for
from portsentinel.config import parse
from portsentinel.daemon.assembly import changes_from_12
from portsentinel.responders import ActionFailed, CompatActions

TUTORIAL = "/sbin/iptables -I INPUT -s $TARGET$ -j DROP"


@pytest.mark.parametrize("command, family", [
    (TUTORIAL, 4),
    ("/usr/sbin/iptables-nft -A INPUT -s $TARGET$ -j DROP", 4),
    ("ip6tables -I INPUT -s $TARGET$ -j DROP", 6),
    ("/sbin/ip6tables-legacy -I INPUT -s $TARGET$ -j DROP", 6),
    ("/sbin/route add -host $TARGET$ reject", 4),
    ("/sbin/route -A inet6 add $TARGET$/128 reject", 6),
    ("ip route add blackhole $TARGET$", None),
    ("ip -6 route add blackhole $TARGET$", 6),
    ("ip -f inet route add blackhole $TARGET$", 4),
    ("/usr/local/bin/ban $TARGET$", 4),  # a 1.2 script never saw IPv6
])
def test_command_family(command, family):
    assert command_family(command.split()) == family


def fake_tools(directory: Path, *names: str, exit_code: int = 0) -> Path:
    """Executables that record their argv in `calls` and exit with `exit_code`
    (an `-C` check exits 1: no such rule)."""
    calls = directory / "calls"
    for name in names:
        tool = directory / name
        tool.write_text(f'#!/bin/sh\necho "$0 $*" >> {calls}\n'
                        f'case "$*" in *-C*) exit 1;; esac\nexit {exit_code}\n')
        tool.chmod(0o755)
    return calls


def test_iptables_becomes_ip6tables_from_the_same_directory(tmp_path):
    fake_tools(tmp_path, "iptables", "ip6tables")
    template = f"{tmp_path}/iptables -I INPUT -s $TARGET$ -j DROP"
    assert kill_route_for(template, 4) == template
    assert kill_route_for(template, 6) == f"{tmp_path}/ip6tables -I INPUT -s $TARGET$ -j DROP"
    assert kill_route_for(f"{tmp_path}/ip6tables -I INPUT -s $TARGET$ -j DROP", 4) == template
    # iptables-nft -> ip6tables-nft, only if it is there
    assert kill_route_for(f"{tmp_path}/iptables-nft -I INPUT -s $TARGET$ -j DROP", 6) is None
    fake_tools(tmp_path, "iptables-nft", "ip6tables-nft")
    assert kill_route_for(f"{tmp_path}/iptables-nft -A INPUT -s $TARGET$ -j DROP", 6) == \
        f"{tmp_path}/ip6tables-nft -A INPUT -s $TARGET$ -j DROP"


def test_no_ip6tables_next_to_it_or_no_ipv6_command(tmp_path):
    fake_tools(tmp_path, "iptables")
    assert kill_route_for(f"{tmp_path}/iptables -I INPUT -s $TARGET$ -j DROP", 6) is None
    assert kill_route_for("/sbin/route add -host $TARGET$ reject", 6) is None
    assert kill_route_for("/usr/local/bin/ban $TARGET$", 6) is None
    assert kill_route_for("ip route add blackhole $TARGET$", 6) == "ip route add blackhole $TARGET$"


def compat(text: str) -> tuple[CompatActions, io.StringIO]:
    out = io.StringIO()
    return CompatActions(parse(text, "test.conf"), logs.Log(to_syslog=False, stream=out)), out


def test_ipv6_source_gets_the_derived_ip6tables_and_its_undo(tmp_path):
    calls = fake_tools(tmp_path, "iptables", "ip6tables")
    actions, out = compat(f'KILL_ROUTE="{tmp_path}/iptables -I INPUT -s $TARGET$ -j DROP"\n')
    v4 = actions.kill_route("198.51.100.2", 1, "atcp")
    v6 = actions.kill_route("2001:db8::2", 1, "atcp")
    actions.kill_route("2001:db8::3", 1, "atcp")
    assert v4 == f"{tmp_path}/iptables -I INPUT -s 198.51.100.2 -j DROP"
    assert v6 == f"{tmp_path}/ip6tables -I INPUT -s 2001:db8::2 -j DROP"
    assert out.getvalue().count("KILL_ROUTE for IPv6 sources runs as") == 1  # said once
    assert actions.undo("2001:db8::2", None, v6, 1, "atcp") == []
    assert calls.read_text().splitlines()[-1] == \
        f"{tmp_path}/ip6tables -D INPUT -s 2001:db8::2 -j DROP"
    assert f'route removed using command: "{tmp_path}/ip6tables -D INPUT' in out.getvalue()


def test_kill_route_undo_follows_the_family_too(tmp_path):
    calls = fake_tools(tmp_path, "iptables", "ip6tables")
    actions, _ = compat(f'KILL_ROUTE="{tmp_path}/iptables -I INPUT -s $TARGET$ -j DROP"\n'
                        f'KILL_ROUTE_UNDO="{tmp_path}/iptables -D INPUT -s $TARGET$ -j DROP"\n')
    run = actions.kill_route("2001:db8::2", 1, "atcp")
    assert actions.undo("2001:db8::2", None, run, 1, "atcp") == []
    assert calls.read_text().splitlines()[-1] == \
        f"{tmp_path}/ip6tables -D INPUT -s 2001:db8::2 -j DROP"


def test_ipv4_only_command_is_skipped_for_ipv6_and_said_once():
    actions, out = compat('KILL_ROUTE="/sbin/route add -host $TARGET$ reject"\n')
    assert actions.kill_route("2001:db8::2", 1, "atcp") is None
    assert actions.kill_route("2001:db8::3", 1, "atcp") is None
    assert out.getvalue().count("it is not run for IPv6 sources, which are banned in the "
                                "nftables set") == 1
    assert "has been blocked" not in out.getvalue()


def test_ipv4_only_command_without_nftables_is_a_failure_for_ipv6():
    actions, out = compat('KILL_ROUTE="/sbin/route add -host $TARGET$ reject"\n'
                          'BLOCK_NFTABLES="0"\n')
    with pytest.raises(ActionFailed, match="IPv4 addresses only"):
        actions.kill_route("2001:db8::2", 1, "atcp")
    assert "IPv6 sources are not blocked" in out.getvalue()


def test_undo_of_a_rule_already_removed_by_hand_is_not_a_problem(tmp_path):
    calls = fake_tools(tmp_path, "iptables", exit_code=1)  # -D fails: no such rule
    actions, out = compat(f'KILL_ROUTE="{tmp_path}/iptables -I INPUT -s $TARGET$ -j DROP"\n')
    run = f"{tmp_path}/iptables -I INPUT -s 198.51.100.2 -j DROP"
    assert actions.undo("198.51.100.2", None, run, 1, "atcp") == []
    assert calls.read_text().splitlines()[-1] == \
        f"{tmp_path}/iptables -C INPUT -s 198.51.100.2 -j DROP"
    assert "route was already removed" in out.getvalue()


def test_undo_failure_is_still_reported(tmp_path):
    (tmp_path / "iptables").write_text("#!/bin/sh\necho locked >&2\nexit 4\n")
    (tmp_path / "iptables").chmod(0o755)
    actions, _ = compat(f'KILL_ROUTE="{tmp_path}/iptables -I INPUT -s $TARGET$ -j DROP"\n')
    run = f"{tmp_path}/iptables -I INPUT -s 198.51.100.2 -j DROP"
    problems = actions.undo("198.51.100.2", None, run, 1, "atcp")
    assert len(problems) == 1 and "exit status 4: locked" in problems[0]


def test_hosts_deny_brackets_ipv6(tmp_path):
    deny = tmp_path / "hosts.deny"
    actions, _ = compat(f'KILL_HOSTS_DENY="ALL: $TARGET$ : DENY"\nHOSTS_DENY_FILE="{deny}"\n')
    assert actions.hosts_deny("2001:db8::2", 1, "atcp") == "ALL: [2001:db8::2] : DENY"
    assert actions.hosts_deny("198.51.100.2", 1, "atcp") == "ALL: 198.51.100.2 : DENY"
    assert deny.read_text().splitlines() == ["ALL: [2001:db8::2] : DENY", "ALL: 198.51.100.2 : DENY"]
    bracketed, _ = compat(f'KILL_HOSTS_DENY="ALL: [$TARGET$] : DENY"\nHOSTS_DENY_FILE="{deny}"\n')
    assert bracketed.hosts_deny("2001:db8::3", 1, "atcp") == "ALL: [2001:db8::3] : DENY"


@pytest.mark.skipif(not Path("/sbin/ip6tables").exists(), reason="iptables not installed")
def test_changes_from_12_for_the_tutorial_config():
    c = parse(f'BLOCK_TCP="1"\nBLOCK_UDP="1"\nKILL_ROUTE="{TUTORIAL}"\n'
              'KILL_HOSTS_DENY="ALL: $TARGET$ : DENY"\n', "/etc/portsentry/portsentry.conf")
    text = "\n".join(changes_from_12(c, "atcp", "audp"))
    assert "nftables set + kernel trap (tcp, udp" in text
    assert "KILL_ROUTE also runs, off the packet path" in text
    assert "KILL_ROUTE runs as /sbin/ip6tables for IPv6 sources" in text
    assert "bans expire after 1d" in text and "undo the nftables ban, KILL_ROUTE and hosts.deny" in text
    old = parse(f'KILL_ROUTE="{TUTORIAL}"\nBLOCK_NFTABLES="0"\n', "x")
    assert "KILL_ROUTE only, as in 1.2" in "\n".join(changes_from_12(old, "atcp", "audp"))
    route = parse('KILL_ROUTE="/sbin/route add -host $TARGET$ reject"\nBLOCK_TCP="0"\n', "x")
    text = "\n".join(changes_from_12(route, "atcp", None))
    assert "BLOCK_TCP=0: those scans are only logged" in text
    assert "not run for IPv6 sources" in text

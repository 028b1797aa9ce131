"""Issue 14, ban effectiveness: which bridges forward IP traffic past our
prerouting drop (read from sysfs and br_netfilter's sysctls, here a fake
tree), and the warnings when a banned source's packets got through one."""

import io
from pathlib import Path

from portsentinel import bridges, logs
from portsentinel.daemon.bypass import WARN_LINES, BypassWatch
from portsentinel.metrics import Metrics


def fake_bridge(net: Path, name: str, ports=(), nf_call=None) -> None:
    (net / name / "bridge").mkdir(parents=True)
    (net / name / "brif").mkdir()
    for port in ports:
        (net / name / "brif" / port).touch()
    for tool, value in (nf_call or {}).items():
        (net / name / "bridge" / f"nf_call_{tool}").write_text(f"{value}\n")


def test_a_bridge_bypasses_where_br_netfilter_does_not_hand_it_to_the_ip_hooks(tmp_path):
    net, proc = tmp_path / "net", tmp_path / "bridge"
    (net / "eth0").mkdir(parents=True)  # not a bridge
    fake_bridge(net, "br0", ["eth1", "vnet0"])
    fake_bridge(net, "br1", [])  # no ports: forwards nothing
    fake_bridge(net, "br2", ["veth2"], {"iptables": 1, "ip6tables": 0})
    found = bridges.bypassing(str(net), str(proc))  # br_netfilter not loaded: all bypass
    assert [(b.name, b.ports, b.bypassed) for b in found] == [
        ("br0", ("eth1", "vnet0"), ("ipv4", "ipv6")), ("br2", ("veth2",), ("ipv4", "ipv6"))]
    assert found[0].describe() == "br0 (ports eth1, vnet0; IPv4 and IPv6)"
    proc.mkdir()  # loaded, both switches off: br2's own switch hands IPv4 over
    for tool in ("iptables", "ip6tables"):
        (proc / f"bridge-nf-call-{tool}").write_text("0\n")
    assert [(b.name, b.bypassed) for b in bridges.bypassing(str(net), str(proc))] == [
        ("br0", ("ipv4", "ipv6")), ("br2", ("ipv6",))]
    for tool in ("iptables", "ip6tables"):  # Debian with Docker, this kernel's default
        (proc / f"bridge-nf-call-{tool}").write_text("1\n")
    assert bridges.bypassing(str(net), str(proc)) == []


class Ctx:
    def __init__(self):
        self.stream = io.StringIO()
        self.log = logs.Log(to_syslog=False, stream=self.stream)
        self.metrics = Metrics()


def test_a_banned_source_getting_through_is_warned_about_once_an_hour_while_it_grows():
    ctx = Ctx()
    watch = BypassWatch(ctx)
    watch.bridges = [bridges.Bridge("br0", ("eth1",), ("ipv4",))]
    watch.through = {"198.51.100.7": 3}
    watch._warn(1000.0)
    watch._warn(1010.0)  # the same, 10 s later: said already
    watch.through = {"198.51.100.7": 9}
    watch._warn(1020.0)  # grown, within the hour: not again
    watch._warn(1000.0 + 3600)  # an hour on, still growing: again
    lines = [l for l in ctx.stream.getvalue().splitlines() if "gets through" in l]
    assert len(lines) == 2 and lines[0].endswith(
        "banned host 198.51.100.7 still gets through bridge br0: 3 packets forwarded past the ban")
    watch.through = {f"198.51.100.{i}": 1 for i in range(10, 10 + WARN_LINES + 5)}
    watch._warn(5000.0)
    text = ctx.stream.getvalue()
    assert text.count("still gets through") == 2 + WARN_LINES
    assert "and 5 more banned hosts get through bridge br0" in text
    assert "198.51.100.7" not in watch._warned  # lifted: forgotten

"""Side-by-side benchmark: PortSentry 1.2 vs portsentinel, in one run.

    sudo .venv/bin/python bench/run.py [--quick]    # writes docs/benchmarks.md
    sudo .venv/bin/python bench/trw.py              # the slow-scan section (no network)

(.venv and the tools come from scripts/test.sh; Debian's portsentry package is
downloaded with apt and unpacked here if it is not there yet.)

Contenders, each started fresh for every measurement in the same lab:
  portsentry-1.2   Debian's binary (unpacked, never installed), -atcp and -audp,
                   KILL_ROUTE="/sbin/iptables -I INPUT -s $TARGET$ -j DROP",
                   run only inside the target namespace with a private /etc overlay
  userspace        portsentinel with KERNEL_TRAP="0": sensor -> engine -> nftables
  kernel-trap      portsentinel defaults: the first trap probe is banned in-kernel
  config unchanged portsentinel started with no -c on PortSentry 1.2's own files,
                   unchanged: the same portsentry.conf and portsentry.ignore as the
                   1.2 contender, /etc/default/portsentry with atcp + audp, in the
                   same kind of private /etc overlay (KILL_ROUTE set)
All traffic stays between the lab's namespaces (198.51.100.0/24, 2001:db8::/64).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import netlab  # noqa: E402
from netlab import TARGET4, TARGET6, ATTACKER4, ATTACKER6, CLIENT4, CLIENT6  # noqa: E402

PROBES = ROOT / "bench" / "probes.py"
PORTSENTINEL = Path(sys.executable).with_name("portsentinel")
DEB_ROOT = Path(os.environ.get("PORTSENTRY_DEB_ROOT", ROOT / ".cache/portsentry/root"))
REAL_TCP, REAL_UDP = {22, 80, 443, 8080}, {53}
CLK = os.sysconf("SC_CLK_TCK")

SCANS = [  # (name, nmap arguments, IPv6?)
    ("SYN -sS", ["-sS"], False),
    ("connect -sT", ["-sT"], False),
    ("FIN -sF", ["-sF"], False),
    ("NULL -sN", ["-sN"], False),
    ("XMAS -sX", ["-sX"], False),
    ("UDP -sU --top-ports 100", ["-sU", "--top-ports", "100"], False),
    ("all ports -sS -T5 -p-", ["-sS", "-T5", "-p-"], False),
    ("slow -sS -T2 --top-ports 20", ["-sS", "-T2", "--top-ports", "20"], False),
    ("IPv6 SYN -sS", ["-sS"], True),
    ("IPv6 connect -sT", ["-sT"], True),
    ("IPv6 UDP -sU --top-ports 100", ["-sU", "--top-ports", "100"], True),
]

PORTSENTRY_CONF = """\
TCP_PORTS="1,11,15,79,111,119,143,540,635,1080,1524,2000,5742,6667,12345,12346,20034,27665,31337,32771,32772,32773,32774,40421,49724,54320"
UDP_PORTS="1,7,9,69,161,162,513,635,640,641,700,37444,34555,31335,32770,32771,32772,32773,32774,31337,54321"
ADVANCED_PORTS_TCP="1024"
ADVANCED_PORTS_UDP="1024"
ADVANCED_EXCLUDE_TCP="113,139"
ADVANCED_EXCLUDE_UDP="520,138,137,67"
IGNORE_FILE="/etc/portsentry/portsentry.ignore"
HISTORY_FILE="{work}/portsentry.history"
BLOCKED_FILE="{work}/portsentry.blocked"
RESOLVE_HOST="0"
BLOCK_UDP="1"
BLOCK_TCP="1"
KILL_ROUTE="/sbin/iptables -I INPUT -s $TARGET$ -j DROP"
SCAN_TRIGGER="0"
"""


def proc_stats(pids: list[int]) -> tuple[float, int]:
    """(CPU seconds incl. waited-for children, peak RSS kB) summed over pids."""
    cpu, rss = 0.0, 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += sum(int(f) for f in fields[11:15]) / CLK
            status = Path(f"/proc/{pid}/status").read_text()
            rss += int(re.search(r"VmHWM:\s+(\d+)", status)[1])
        except (OSError, TypeError):
            pass
    return cpu, rss


CPUACCT = Path("/sys/fs/cgroup/cpuacct")  # cgroup v1; cgroup v2 has cpu.stat


class CpuGroup:
    """CPU of processes and everything they fork from now on, in ns (a cgroup
    of the bench's own), where the machine has one; else clock ticks."""

    def __init__(self, name: str, pids: list[int]):
        self.path = CPUACCT / f"portsentinel-bench-{os.getpid()}-{name}"
        self.pids, self.ok = pids, CPUACCT.is_dir()
        if self.ok:
            try:
                self.path.mkdir(exist_ok=True)
                for pid in pids:
                    (self.path / "cgroup.procs").write_text(str(pid))
            except OSError:
                self.ok = False
        self.start = self.seconds()

    def seconds(self) -> float:
        if self.ok:
            return int((self.path / "cpuacct.usage").read_text()) / 1e9
        return proc_stats(self.pids)[0]

    def used(self) -> float:
        return self.seconds() - self.start

    def close(self) -> None:
        if self.ok:
            for pid in (self.path / "cgroup.procs").read_text().split():
                try:
                    (CPUACCT / "cgroup.procs").write_text(pid)
                except OSError:
                    pass
            try:
                self.path.rmdir()
            except OSError:
                pass


class Contender:
    name = ""

    def __init__(self, lab: netlab.Lab, work: Path):
        self.lab, self.work = lab, work

    def reset_firewall(self) -> None:
        self.lab.exec("target", "nft", "delete", "table", "inet", "portsentinel")
        self.lab.exec("target", "iptables", "-F", "INPUT")
        self.lab.exec("target", "ip6tables", "-F", "INPUT")

    def blocked(self, source: str) -> bool:
        raise NotImplementedError

    def pids(self) -> list[int]:
        raise NotImplementedError


class Portsentinel(Contender):
    def __init__(self, lab, work, kernel_trap: bool, extra: str = ""):
        super().__init__(lab, work)
        self.extra = extra
        self.name = "portsentinel kernel-trap" if kernel_trap else "portsentinel userspace"
        self.kernel_trap = kernel_trap
        self.proc = None
        self.binary = PORTSENTINEL  # --baseline: another checkout's, side by side

    def start(self) -> None:
        self.reset_firewall()
        conf = self.work / "portsentinel.conf"
        state = self.work / "ps-state.db"
        for stale in self.work.glob("ps-state.db*"):  # every measurement starts with no bans
            stale.unlink()
        conf.write_text('TCP_MODE="atcp"\nUDP_MODE="audp"\n'
                        f'HISTORY_FILE="{self.work}/ps.history"\n'
                        f'BLOCKED_FILE="{self.work}/ps.blocked"\n'
                        f'STATE_FILE="{state}"\nCONTROL_SOCKET="{self.work}/ps.sock"\n'
                        + ('' if self.kernel_trap else 'KERNEL_TRAP="0"\n')
                        + self.extra)
        self.log = self.work / "portsentinel.log"
        self.proc = self.lab.start("target", str(self.binary), "run", "-c", str(conf),
                                   "--foreground", "--log", "stdout",
                                   "--pid-file", str(self.work / "pid"),
                                   stdout=self.log.open("w"))
        netlab.wait_for_line(self.log, "now active and listening", 15)

    def stop(self) -> None:
        self.lab.stop(self.proc)

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def blocked(self, source: str) -> bool:
        """In a ban set (not just anywhere in the table: a client is in the peers sets)."""
        name = "ban6" if ":" in source else "ban4"
        out = self.lab.exec("target", "nft", "list", "set", "inet", "portsentinel", name).stdout
        return re.search(rf"[{{ ,]{re.escape(source)}[ ,}}]", out) is not None

    def alerts(self) -> int:
        return self.log.read_text().count("attackalert: TCP SYN/Normal scan")


class ConfigUnchanged(Portsentinel):
    """A PortSentry user's files kept as they are: /etc/portsentry/portsentry.conf
    (the 1.2 contender's, KILL_ROUTE included), portsentry.ignore and
    /etc/default/portsentry, in a private mount namespace (overlay on /etc,
    tmpfs on /var/lib and /run: the host's files are never written); the daemon
    is started with no -c and finds them itself."""

    name = "PortSentry config unchanged (KILL_ROUTE)"

    def __init__(self, lab, work):
        super().__init__(lab, work, True)
        self.name = ConfigUnchanged.name

    def start(self) -> None:
        self.reset_firewall()
        upper, workdir = self.work / "cu-etc-upper", self.work / "cu-etc-work"
        subprocess.run(["rm", "-rf", str(upper), str(workdir)], check=True)
        (upper / "portsentry").mkdir(parents=True)
        (upper / "default").mkdir()
        workdir.mkdir()
        (upper / "portsentry/portsentry.conf").write_text(PORTSENTRY_CONF.format(work=self.work))
        (upper / "portsentry/portsentry.ignore").write_text(f"127.0.0.1/32\n0.0.0.0\n{TARGET4}\n")
        (upper / "default/portsentry").write_text('TCP_MODE="atcp"\nUDP_MODE="audp"\n')
        script = (f"mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={workdir} /etc"
                  " && mount -t tmpfs tmpfs /var/lib && mount -t tmpfs tmpfs /run"
                  f" && exec {PORTSENTINEL} run --foreground --log stdout")
        self.log = self.work / "config-unchanged.log"
        self.proc = self.lab.start("target", "unshare", "--mount", "--propagation", "private",
                                   "sh", "-c", script, stdout=self.log.open("w"))
        netlab.wait_for_line(self.log, "now active and listening", 15)

    def blocked(self, source: str) -> bool:
        """In the nftables set, and KILL_ROUTE's rule (ip6tables for IPv6) in place."""
        tool, suffix = ("ip6tables", "/128") if ":" in source else ("iptables", "/32")
        rules = self.lab.exec("target", tool, "-S", "INPUT").stdout
        return super().blocked(source) and f"-s {source}{suffix} -j DROP" in rules


def fetch_portsentry() -> Path:
    """Debian's portsentry 1.2 package, downloaded with apt and unpacked into
    .cache (never installed: no service starts, nothing runs outside the lab)."""
    binary = DEB_ROOT / "usr/sbin/portsentry"
    if binary.exists():
        return binary
    cache = DEB_ROOT.parent
    cache.mkdir(parents=True, exist_ok=True)
    got = subprocess.run(["apt-get", "download", "portsentry"], cwd=cache, capture_output=True)
    if got.returncode:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "download", "portsentry"], cwd=cache, check=True)
    deb = sorted(cache.glob("portsentry_*.deb"))[-1]
    subprocess.run(["dpkg-deb", "-x", str(deb), str(DEB_ROOT)], check=True)
    return binary


class Portsentry12(Contender):
    name = "PortSentry 1.2"

    def __init__(self, lab, work):
        super().__init__(lab, work)
        self.binary = fetch_portsentry()
        self._pids: list[int] = []

    def start(self) -> None:
        self.reset_firewall()
        upper, workdir = self.work / "etc-upper", self.work / "etc-work"
        subprocess.run(["rm", "-rf", str(upper), str(workdir)], check=True)
        (upper / "portsentry").mkdir(parents=True)
        workdir.mkdir()
        (upper / "portsentry/portsentry.conf").write_text(PORTSENTRY_CONF.format(work=self.work))
        (upper / "portsentry/portsentry.ignore").write_text(
            f"127.0.0.1/32\n0.0.0.0\n{TARGET4}\n")
        before = self._netns_pids()
        script = (f"mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={workdir} /etc"
                  f" && {self.binary} -atcp && {self.binary} -audp")
        done = self.lab.exec("target", "unshare", "--mount", "--propagation", "private",
                             "sh", "-c", script, timeout=30)
        if done.returncode:
            raise RuntimeError(f"portsentry 1.2 failed: {done.stderr}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self._pids = [p for p in self._netns_pids() - before
                          if os.path.realpath(f"/proc/{p}/exe") == str(self.binary)]
            if len(self._pids) == 2:
                break
            time.sleep(0.1)
        time.sleep(1.0)  # 1.2 opens its raw sockets after it forks

    def _netns_pids(self) -> set[int]:
        out = netlab.sh("ip", "netns", "pids", self.lab.ns["target"], check=False).stdout
        return {int(p) for p in out.split()}

    def stop(self) -> None:
        for pid in self._pids:  # by PID, never by name
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass
        time.sleep(0.3)
        self._pids = []

    def pids(self) -> list[int]:
        return list(self._pids)

    def blocked(self, source: str) -> bool:
        out = self.lab.exec("target", "iptables", "-S", "INPUT").stdout
        return f"-s {source}/32" in out


# -- measurements -------------------------------------------------------------
def counters_install(lab: netlab.Lab, source: str) -> None:
    match = "ip6 saddr" if ":" in source else "ip saddr"
    tcp = f"{match} {source} tcp flags & (ack | rst) == 0"
    udp = f"{match} {source} meta l4proto udp"
    rules = f"""
table inet bench {{
  counter arrived {{}}
  counter passed {{}}
  chain pre {{
    type filter hook prerouting priority -400; policy accept;
    {tcp} counter name arrived
    {udp} counter name arrived
  }}
  chain post {{
    type filter hook input priority 100; policy accept;
    {tcp} counter name passed
    {udp} counter name passed
  }}
}}
"""
    lab.exec("target", "nft", "delete", "table", "inet", "bench")
    done = lab.exec("target", "nft", "-f", "-", input=rules)
    assert done.returncode == 0, done.stderr


def counters_read(lab: netlab.Lab) -> dict[str, int]:
    out = json.loads(lab.exec("target", "nft", "-j", "list", "counters", "table", "inet",
                              "bench").stdout)
    return {item["counter"]["name"]: item["counter"]["packets"]
            for item in out["nftables"] if "counter" in item}


def parse_nmap(text: str) -> tuple[dict[int, str], bool, bool]:
    """(port -> state, any closed port seen, host timed out)."""
    states = {int(m[1]): m[3] for m in re.finditer(r"^(\d+)/(tcp|udp|sctp)\s+(\S+)", text,
                                                   re.M)}
    closed = "closed" in states.values() or re.search(r"Not shown: \d+ closed", text) is not None
    return states, closed, "host timeout" in text


def answered(text: str) -> int:
    """Ports (-sO: protocols) nmap got an answer from, listed or summed in
    "Not shown": `open`, `closed`, `unfiltered` (an ACK scan's). A state with
    "filtered" in it (`open|filtered`: no answer) taught it nothing."""
    learned = ("open", "closed", "unfiltered")
    listed = sum(m[1] in learned for m in re.finditer(r"^\d+(?:/(?:tcp|udp|sctp))?\s+(\S+)\s",
                                                        text, re.M))
    hidden = sum(int(m[1]) for line in re.findall(r"^Not shown: (.*)$", text, re.M)
                 for m in re.finditer(r"(\d+) (\S+) (?:tcp|udp|sctp|n/a) (?:ports|protocols)",
                                      line)
                 if m[2] in learned)
    return listed + hidden


def revealed(states: dict[int, str], closed_seen: bool, real: set[int]) -> set[int]:
    """Real ports the scanner can tell apart: `open`, or `open|filtered` next to closed ones."""
    return {p for p, s in states.items() if p in real
            and (s == "open" or (s == "open|filtered" and closed_seen))}


def legit_start(lab) -> subprocess.Popen:
    """A legitimate client (tests/legit.py mix: port reuse into TIME_WAIT, bursts
    of short connections, UDP queries with retries), running through the scan."""
    return lab.start("client", sys.executable, str(ROOT / "tests/legit.py"), "mix", TARGET4,
                     TARGET6, "900", stdout=subprocess.PIPE)


def legit_finish(lab, proc: subprocess.Popen) -> dict:
    lab.stop(proc, timeout=30)  # SIGTERM: it ends its round and prints its counts
    try:
        return json.loads(proc.stdout.read() or b"{}")
    except ValueError:
        return {}


def run_scan(lab, contender, name, args, v6, host_timeout: int = 300,
             cgroup: bool = False) -> dict:
    source = ATTACKER6 if v6 else ATTACKER4
    target = TARGET6 if v6 else TARGET4
    counters_install(lab, source)  # before the start: a foreign commit would cost the daemon
    contender.start()              # a listing of its table at its next reconciliation (12 ms)
    client = legit_start(lab)
    time.sleep(0.5)
    cpu0, _ = proc_stats(contender.pids())
    group = CpuGroup(re.sub(r"\W+", "-", contender.name), contender.pids()) if cgroup else None
    t0 = time.monotonic()
    argv = ["nmap", *(["-6"] if v6 else []), *args, "-Pn", "-n", "--max-retries", "0",
            "--max-rtt-timeout", "100ms", "--host-timeout", f"{host_timeout}s", "-e", "eth0",
            "-S", source, target]
    if not any(a.startswith("-T") for a in args):
        argv.insert(1, "-T4")
    done = lab.exec("attacker", *argv, timeout=400)
    seconds = time.monotonic() - t0
    cpu1, rss = proc_stats(contender.pids())
    if group is not None:
        cpu0, cpu1 = 0.0, group.used()
        group.close()
    legit = legit_finish(lab, client)
    counts = counters_read(lab)
    states, closed, timed_out = parse_nmap(done.stdout)
    real = REAL_UDP if "-sU" in args else REAL_TCP
    result = {
        "contender": contender.name, "scan": name, "detected": contender.blocked(source),
        "revealed": len(revealed(states, closed, real)), "real": len(real),
        "answered": answered(done.stdout),
        "arrived": counts.get("arrived", 0), "passed": counts.get("passed", 0),
        "cpu": cpu1 - cpu0, "rss_kb": rss, "nmap_s": seconds, "timeout": timed_out,
        "legit_failed": legit.get("failed", -1),
        "legit_total": legit.get("ok", 0) + legit.get("failed", 0),
        "clients_banned": sum(contender.blocked(c) for c in (CLIENT4, CLIENT6)),
    }
    contender.stop()
    print(json.dumps(result), flush=True)
    return result


def latency_trial(lab, contender, gap_us: float, count: int) -> tuple[float | None, int]:
    """(ms from the trap probe to the block, probes answered after the trap probe)."""
    contender.start()
    sniffer = lab.start("target", sys.executable, str(PROBES), "sniff", "4", ATTACKER4,
                        stdout=subprocess.PIPE)
    assert sniffer.stdout.readline().strip() == b"ready"
    lab.exec("attacker", sys.executable, str(PROBES), "stream", ATTACKER4, TARGET4, "1", "2000",
             str(gap_us), str(count), timeout=30)
    data = json.loads(sniffer.stdout.readline())
    sniffer.wait(10)
    blocked = contender.blocked(ATTACKER4)
    contender.stop()
    trap = next((t for t, port, _ in data["in"] if port == 1), None)
    follow = [t for t, port, _ in data["in"] if port == 2000]
    answered = sum(1 for _, port, flags in data["out"] if port == 2000)
    if trap is None or not blocked:
        return None, answered
    if answered == 0:
        return 0.0, 0
    return (follow[answered - 1] - trap) * 1000, answered


class AlertCount:
    """Alert lines in a growing log, read on from where it stopped: rereading
    the whole log every 0.2 s took a core's worth of the bench's own CPU by
    the end of a 60,000-source flood, beside the daemon measured."""

    LINE = b"attackalert: TCP SYN/Normal scan"

    def __init__(self, path: Path):
        self.file, self.count, self._tail = path.open("rb"), 0, b""

    def __call__(self) -> int:
        data = self._tail + self.file.read()
        cut = data.rfind(b"\n") + 1
        self.count += data[:cut].count(self.LINE)
        self._tail = data[cut:]
        return self.count

    def close(self) -> None:
        self.file.close()


def sustained(samples: list[tuple[float, int]], handled: int) -> float:
    """Sources handled a second, from the flood's start to when the last
    was handled: the flood's rate if the daemon kept up, less if it fell
    behind (done later) or lost some (the kernel log's buffer overflowed).
    `samples`: (seconds from the start, count), taken from the flood's end."""
    done = next((t for t, n in samples if n >= handled), samples[-1][0])
    return handled / done if done > 0 else 0.0


def capacity(lab, contender, rates: list[int], seconds: float) -> list[dict]:
    mac = re.search(r"link/ether (\S+)", lab.exec("target", "ip", "link", "show", "eth0").stdout)[1]
    rows = []
    for rate in rates:
        contender.start()
        alerts = AlertCount(contender.log)
        alerts0 = alerts()
        cpu0, _ = proc_stats(contender.pids())
        t0 = time.monotonic()
        out = lab.exec("attacker", sys.executable, str(PROBES), "flood", "eth0", mac, TARGET6,
                       str(rate), str(seconds), "1", timeout=seconds + 60).stdout
        sent = json.loads(out)["sent"]
        samples = [(time.monotonic() - t0, alerts() - alerts0)]
        deadline = time.monotonic() + 10  # let it drain
        while samples[-1][1] < sent and time.monotonic() < deadline:
            time.sleep(0.2)
            samples.append((time.monotonic() - t0, alerts() - alerts0))
        wall = time.monotonic() - t0
        cpu1, rss = proc_stats(contender.pids())
        handled = alerts() - alerts0
        alerts.close()
        row = {"contender": contender.name, "rate": rate, "sent": sent, "handled": handled,
               "cpu_pct": 100 * (cpu1 - cpu0) / wall, "rss_kb": rss, "wall": wall,
               "sustained": sustained(samples, handled)}
        contender.stop()
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def spoofed_flood(lab, contender, sources: int, rate: int) -> dict:
    """`sources` distinct spoofed IPv6 sources with the defaults (rate limit on),
    then a real scan: memory stays bounded, the firewall is not filled, the
    real scanner is still detected."""
    mac = re.search(r"link/ether (\S+)", lab.exec("target", "ip", "link", "show", "eth0").stdout)[1]
    contender.start()
    _, rss0 = proc_stats(contender.pids())
    out = lab.exec("attacker", sys.executable, str(PROBES), "flood", "eth0", mac, TARGET6,
                   str(rate), str(sources / rate), "1", timeout=sources / rate + 120).stdout
    sent = json.loads(out)
    time.sleep(2)
    _, rss1 = proc_stats(contender.pids())
    bans = lab.exec("target", "sh", "-c", "nft -j list set inet portsentinel ban6").stdout.count('"val"')
    nmap_out = lab.exec("attacker", "nmap", "-sS", "-Pn", "-n", "--max-retries", "0",
                        "--top-ports", "100", "-e", "eth0", "-S", ATTACKER4, TARGET4, timeout=120)
    time.sleep(1)
    detected = f"from host: {ATTACKER4}/{ATTACKER4}" in contender.log.read_text()
    row = {"sent": sent["sent"], "seconds": sent["seconds"], "rss0_kb": rss0, "rss1_kb": rss1,
           "bans": bans, "real_detected": detected, "real_blocked": contender.blocked(ATTACKER4),
           "real_revealed": len(revealed(*parse_nmap(nmap_out.stdout)[:2], REAL_TCP))}
    contender.stop()
    print(json.dumps(row), flush=True)
    return row


RECON_SCANS = [  # issue 19: probes the trap did not see (to every port, or to served ones)
    ("ACK -sA", ["-sA"], False),
    ("Window -sW", ["-sW"], False),
    ("Maimon -sM", ["-sM"], False),
    ("SYN/ACK --scanflags SYNACK", ["-sS", "--scanflags", "SYNACK"], False),
    ("NULL to served ports -sN -p 22,80,443,8080", ["-sN", "-p", "22,80,443,8080"], False),
    ("SYN+FIN to served ports --scanflags SYNFIN -p 22,80,443,8080",
     ["-sS", "--scanflags", "SYNFIN", "-p", "22,80,443,8080"], False),
    ("FIN+RST to served ports --scanflags FINRST -p 22,80,443,8080",
     ["-sS", "--scanflags", "FINRST", "-p", "22,80,443,8080"], False),
    ("OS detection -O -p 22,80", ["-O", "-p", "22,80"], False),
    ("IPv6 ACK -sA", ["-sA"], True),
    ("IP protocols -sO", ["-sO"], False),
    ("IPv6 IP protocols -sO", ["-sO"], True),
    ("SCTP INIT -sY", ["-sY"], False),
    ("IPv6 SCTP INIT -sY", ["-sY"], True),
    ("SCTP COOKIE-ECHO -sZ", ["-sZ"], False),
]


def recon_compare(lab, work: Path, only: list[str] | None = None) -> list[dict]:
    """RECON_SCANS (or those whose name starts with one of `only`) against
    1.2 and portsentinel's defaults, in turn, one run."""
    return [run_scan(lab, contender, name, nmap_args, v6, host_timeout=60, cgroup=True)
            for name, nmap_args, v6 in RECON_SCANS
            if not only or any(name.startswith(o) for o in only)
            for contender in (Portsentry12(lab, work), Portsentinel(lab, work, True))]


def recon_table(results: list[dict]) -> str:
    names = list(dict.fromkeys(r["contender"] for r in results))
    rows = []
    for scan in dict.fromkeys(r["scan"] for r in results):
        cells = {r["contender"]: r for r in results if r["scan"] == scan}
        row = [scan]
        for name in names:
            r = cells[name]
            row.append(f"{'banned' if r['detected'] else '**not banned**'}; "
                       f"{r['answered']} ports answered; {1000 * r['cpu']:.1f} ms CPU; "
                       f"legit {r['legit_failed']} failed; nmap {r['nmap_s']:.1f} s")
        rows.append(row)
    return table(["scan", *names], rows)


SENSOR_SCANS = [s for s in SCANS if s[0].split()[0] in ("SYN", "connect", "FIN", "NULL", "XMAS",
                                                         "UDP", "all")]


def sensor_compare(lab, work: Path, only: list[str] | None = None) -> list[dict]:
    """The scans issue 18 names (or those whose name starts with one of `only`),
    each against 1.2, the packet sensor (AF_PACKET, KERNEL_SENSOR=0) and the
    kernel as the sensor, in turn, in one run."""
    packet = Portsentinel(lab, work, True, 'KERNEL_SENSOR="0"\n')
    packet.name = "packet sensor (AF_PACKET)"
    kernel = Portsentinel(lab, work, True)
    kernel.name = "kernel as the sensor"
    return [run_scan(lab, contender, name, nmap_args, v6, host_timeout=60, cgroup=True)
            for name, nmap_args, v6 in SENSOR_SCANS
            if not only or any(name.startswith(o) for o in only)
            for contender in (Portsentry12(lab, work), packet, kernel)]


def sensor_table(results: list[dict]) -> str:
    names = ["PortSentry 1.2", "packet sensor (AF_PACKET)", "kernel as the sensor"]
    rows = []
    for scan in dict.fromkeys(r["scan"] for r in results):
        cells = {r["contender"]: r for r in results if r["scan"] == scan}
        base = cells["PortSentry 1.2"]["cpu"]
        row = [scan]
        for name in names:
            r = cells[name]
            ratio = "" if name == names[0] else (f" ({r['cpu'] / base:.1f}x)" if base else "")
            row.append(f"{1000 * r['cpu']:.1f} ms{ratio}; {r['revealed']}/{r['real']} open; "
                       f"{r['passed']}/{r['arrived']} in; legit {r['legit_failed']} failed; "
                       f"nmap {r['nmap_s']:.1f} s")
        rows.append(row)
    return table(["scan", *names], rows)


def idle(lab, contenders, seconds: float) -> list[dict]:
    """CPU and RSS of each contender with nothing happening, after its start-up."""
    rows = []
    for contender in contenders:
        contender.start()
        time.sleep(2.0)  # start-up work done (adoption, first housekeeping)
        cpu0, _ = proc_stats(contender.pids())
        time.sleep(seconds)
        cpu1, rss = proc_stats(contender.pids())
        contender.stop()
        row = {"contender": contender.name, "cpu_pct": 100 * (cpu1 - cpu0) / seconds,
               "rss_mb": rss / 1024, "seconds": seconds}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def idle_table(rows: list[dict]) -> str:
    return table(["contender", "idle CPU % of one core", "RSS MiB"],
                 [[r["contender"], f"{r['cpu_pct']:.2f}", f"{r['rss_mb']:.0f}"] for r in rows])


def state_load(lab, work: Path, counts: list[int], binary: Path = PORTSENTINEL,
               name: str = "") -> list[dict]:
    """Start-up time of portsentinel with N stored bans (IPv4 and IPv6 halves)."""
    from portsentinel.store import BanRecord, Store

    rows = []
    for count in counts:
        state = work / f"state-{count}.db"
        store = Store(state)
        now = time.time()
        store.add_bans([BanRecord(str(ipaddress.IPv4Address(0x0B000000 + i)) if i % 2 else
                                  str(ipaddress.IPv6Address((0x20010DB8 << 96) + (5 << 64) + i)),
                                  now, now + 86400, 1, "tcp", "atcp", "TCP SYN/Normal scan")
                        for i in range(count)])
        store.close()
        conf = work / "load.conf"
        conf.write_text(f'TCP_MODE="atcp"\nSTATE_FILE="{state}"\n'
                        f'CONTROL_SOCKET="{work}/load.sock"\nHISTORY_FILE="{work}/load.h"\n'
                        f'BLOCKED_FILE="{work}/load.b"\n')
        lab.exec("target", "nft", "delete", "table", "inet", "portsentinel")
        log = work / f"load-{count}.log"
        t0 = time.monotonic()
        proc = lab.start("target", str(binary), "run", "-c", str(conf), "--foreground",
                         "--log", "stdout", "--pid-file", str(work / "load.pid"),
                         stdout=log.open("w"))
        netlab.wait_for_line(log, "now active and listening", 60)
        ready = time.monotonic() - t0
        restore = re.search(r"in ([\d.]+) s", log.read_text())
        lab.stop(proc)
        in_kernel = lab.exec("target", "sh", "-c", "nft -j list set inet portsentinel ban4; "
                             "nft -j list set inet portsentinel ban6").stdout.count('"val"')
        row = {"contender": name or "portsentinel", "bans": count, "ready_s": ready,
               "restore_s": float(restore[1]) if restore else 0.0, "in_kernel": in_kernel}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


# -- report -------------------------------------------------------------------
def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def leak_table(lab, work: Path, runs: int) -> str:
    """How often a real port leaks, over repeated scans (one run per cell
    cannot show what happens now and then)."""
    delayed = Portsentinel(lab, work, True, 'FIRST_CONTACT_DELAY="1"\n')
    delayed.name = "kernel trap + FIRST_CONTACT_DELAY"
    rows = []
    for contender in (Portsentinel(lab, work, True), delayed, ConfigUnchanged(lab, work)):
        for name, nmap_args in (("SYN -sS", ["-sS"]), ("connect -sT", ["-sT"])):
            results = [run_scan(lab, contender, name, nmap_args, False) for _ in range(runs)]
            leaked = [r["revealed"] for r in results]
            rows.append([contender.name, name, str(runs), str(sum(1 for n in leaked if n)),
                         str(sum(leaked)), str(max(r["passed"] for r in results))])
    return table(["contender", "scan", "runs", "runs revealing a real port",
                  "real ports revealed in all", "most probes in, one run"], rows)


def latency_table(latency: dict) -> str:
    rows = []
    for c, values in latency.items():
        blocked = [v for v, _ in values if v is not None]
        through = [n for _, n in values]
        if blocked:
            rows.append([c, f"{len(blocked)}/{len(values)}", f"{statistics.median(blocked):.2f}",
                         f"{max(blocked):.2f}", f"{statistics.median(through):.0f}"])
        else:
            rows.append([c, f"0/{len(values)}", "-", "-", "-"])
    return table(["contender", "blocked", "median ms", "max ms", "median probes through"], rows)


def scan_table(scans) -> str:
    names = [c for c in dict.fromkeys(r["contender"] for r in scans)]
    by = {(r["contender"], r["scan"]): r for r in scans}
    scan_rows = []
    for name, _, _ in SCANS:
        if not any((c, name) in by for c in names):
            continue
        row = [name]
        for c in names:
            r = by.get((c, name))
            if r is None:
                row.append("-")
                continue
            detected = "yes" if r["detected"] else "**no**"
            row.append(f"{detected}; {r['revealed']}/{r['real']} open; "
                       f"{r['passed']}/{r['arrived']} probes in; {r['cpu']:.2f}s CPU"
                       + ("; nmap timed out" if r["timeout"] else "")
                       + (f"; legit {r['legit_failed']}/{r['legit_total']} failed, "
                          f"{r['clients_banned']} clients banned" if "legit_total" in r else ""))
        scan_rows.append(row)
    return table(["scan", *names], scan_rows)


def report(scans, latency, cap, load, flood, args) -> str:
    nmap_version = netlab.sh("nmap", "--version").stdout.split("\n")[0]
    names = [c for c in dict.fromkeys(r["contender"] for r in scans)]
    rss_rows = [[c, max(r["rss_kb"] for r in scans if r["contender"] == c) // 1024]
                for c in names]

    return f"""# Benchmarks

Produced by `bench/run.py` on {time.strftime('%Y-%m-%d')} ({platform.machine()}, {os.cpu_count()} cores,
kernel {platform.release()}, {nmap_version}); all contenders measured in one run, in the
same namespace lab (target 198.51.100.1 / 2001:db8::1 serving TCP 22, 80, 443, 8080 and
UDP 53; attacker .2 / ::2). Each cell is a fresh start of the contender.{' Quick mode.' if args.quick else ''}

Contenders:
- **PortSentry 1.2**: Debian's binary, `-atcp` and `-audp`, `SCAN_TRIGGER="0"`,
  `KILL_ROUTE="/sbin/iptables -I INPUT -s $TARGET$ -j DROP"`.
- **portsentinel userspace**: atcp + audp, `KERNEL_TRAP="0"`: packet sensor → engine →
  nftables set (no fork), the path every mode and `SCAN_TRIGGER` > 1 use.
- **portsentinel kernel-trap**: the defaults: the first probe to a trap port is banned
  by an nftables rule before the next packet is processed.
- **PortSentry config unchanged (KILL_ROUTE)**: portsentinel started with no `-c` on the
  1.2 contender's own files, unchanged (`KILL_ROUTE` set; `/etc/default/portsentry`:
  atcp + audp), in a private `/etc` overlay: nftables ban and kernel trap first, the
  `KILL_ROUTE` (`ip6tables` for IPv6) in addition; "detected" also requires its rule.

## Scans: what nmap learns

Per cell: detected and blocked?; real open ports nmap can tell apart (`open`, or
`open|filtered` while other ports show `closed`) of those it probed; probes (TCP
without ACK/RST, and UDP) that got past every firewall rule of the target / probes that
arrived (nftables counters at prerouting -400 and input +100); daemon CPU time during
the scan (with children, e.g. 1.2's iptables). nmap runs with `-T4` unless stated,
`--max-retries 0 --max-rtt-timeout 100ms` (the lab's round trip is tens of µs; this
only shortens nmap's wait on dropped probes).

{scan_table(scans)}

Peak RSS (MiB, largest over the scans):

{table(["contender", "peak RSS MiB"], rss_rows)}

## First probe to block

One SYN to trap port 1, then a SYN to port 2000 (closed, not watched) every
{args.gap:.0f} µs; a sniffer in the target records kernel timestamps. The block time is
from the trap probe to the last follow-up probe that was still answered (so the
resolution is one gap; 0 means not even the next probe got through).
{args.trials} trials per contender.

{latency_table(latency)}

## Capacity (userspace path)

SYN floods to a trap port from distinct IPv6 sources in 2001:db8::/64, {args.flood_seconds:.0f} s
per rate, with `KERNEL_TRAP="0"` and `BAN_RATE_LIMIT="0"` (every source goes through
sensor, engine and a netlink ban); handled = sources alerted and banned by the daemon
(within 10 s after the flood); CPU = daemon CPU over the flood and the drain.
PortSentry 1.2 is not run here: it forks iptables for each source.

{table(["contender", "probes/s", "sent", "handled", "CPU %", "peak RSS MiB"],
       [[r["contender"], r["rate"], r["sent"], r["handled"], f"{r['cpu_pct']:.0f}",
         r["rss_kb"] // 1024] for r in cap])}

## A flood from {flood["sent"]:,} spoofed sources

portsentinel with its defaults (kernel trap, `BAN_RATE_LIMIT="20/s"`) receives
{flood["sent"]:,} SYNs to a trap port, each from a different IPv6 source in
2001:db8::/64 ({flood["sent"] / flood["seconds"]:,.0f} probes/s over {flood["seconds"]:.0f} s), then
a real `nmap -sS --top-ports 100` from 198.51.100.2.

{table(["peak RSS before MiB", "peak RSS after MiB", "bans in the firewall", "real scanner detected",
        "real scanner blocked", "real open ports revealed"],
       [[flood["rss0_kb"] // 1024, flood["rss1_kb"] // 1024, flood["bans"],
         "yes" if flood["real_detected"] else "**no**",
         "yes" if flood["real_blocked"] else "no", f"{flood['real_revealed']}/4"]])}

Memory is bounded by fixed-capacity tables (engine: `HOST_CAPACITY` hosts being
counted, 262,144 bans; the kernel sets' sizes), and the rate limit keeps the
firewall from filling: bans stop at the limit, detection goes on.

## Restart with stored bans

portsentinel started with N bans in its state file (half IPv4, half IPv6) and an
empty nftables table (as after a reboot): time from launch to "active and
listening", the restore step alone, and the bans in the kernel sets afterwards.

{table(["stored bans", "launch to ready s", "restore s", "in the kernel after"],
       [[r["bans"], f"{r['ready_s']:.2f}", f"{r['restore_s']:.2f}", r["in_kernel"]]
        for r in load])}
"""


def baseline(contender: "Portsentinel", binary: Path) -> "Portsentinel":
    contender.binary = binary
    contender.name += " (baseline)"
    return contender


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer scans and trials")
    parser.add_argument("--trials", type=int, default=15)
    parser.add_argument("--gap", type=float, default=100.0, help="µs between follow-up probes")
    parser.add_argument("--flood-seconds", type=float, default=3.0)
    parser.add_argument("--rates", type=lambda text: [int(n) for n in text.split(",")],
                        metavar="N,N", help="new sources a second of the capacity floods")
    parser.add_argument("--output", type=Path, default=ROOT / "docs/benchmarks.md")
    parser.add_argument("--latency-only", action="store_true",
                        help="only the first-probe-to-block trials; print the table")
    parser.add_argument("--scans-only", action="store_true",
                        help="only the scans and the first-probe-to-block trials, every "
                             "contender in one run; print the tables")
    parser.add_argument("--recon-only", action="store_true",
                        help="only: the reconnaissance scans of issue 19 (ACK, Window, "
                             "Maimon, flags no stack sends, -O) against 1.2 and the defaults; "
                             "print the table")
    parser.add_argument("--sensor-compare", action="store_true",
                        help="only: CPU per scan of PortSentry 1.2, the packet sensor and the "
                             "kernel as the sensor (issue 18's scans); print the table")
    parser.add_argument("--only", metavar="SCANS",
                        help="with --sensor-compare or --recon-only: only these scans (comma-separated "
                             "name prefixes, e.g. SYN,connect)")
    parser.add_argument("--restart-only", action="store_true",
                        help="only: start-up with 0, 10,000 and 100,000 stored bans; print "
                             "the table")
    parser.add_argument("--idle-only", type=float, default=0, metavar="SECONDS",
                        help="only: each contender idle for SECONDS after its start; print "
                             "the table")
    parser.add_argument("--hold-only", action="store_true",
                        help="only: the first-contact hold's tables (bench/hold.py: 20 runs "
                             "of each scan beside 1.2 and the hold off, the price); print them")
    parser.add_argument("--flood-only", action="store_true",
                        help="only: the 1,000,000-source spoofed flood with the defaults "
                             "(peak RSS before and after, then a real scan); print the row")
    parser.add_argument("--capacity-only", action="store_true",
                        help="only: the userspace path's capacity (new sources a second); "
                             "print the table")
    parser.add_argument("--rounds", type=int, default=1, metavar="N",
                        help="with --capacity-only: every rate N times, taking turns "
                             "(these machines are noisy)")
    parser.add_argument("--baseline", type=Path, metavar="BIN",
                        help="with --capacity-, --idle- or --restart-only: also run this "
                             "portsentinel "
                             "(another checkout's .venv/bin/portsentinel), side by side")
    parser.add_argument("--leak-trials", type=int, default=0, metavar="N",
                        help="only: N runs of -sS and -sT against the kernel trap, with and "
                             "without FIRST_CONTACT_DELAY, and PortSentry's config unchanged; "
                             "print the table")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (it builds network namespaces)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # run the cleanup
    scans = SCANS[:2] + SCANS[8:9] if args.quick else SCANS
    if args.quick:
        args.trials = min(args.trials, 5)
    rates = args.rates or ([2000, 5000] if args.quick else [2000, 5000, 10000, 20000])
    with netlab.Lab("bn") as lab, tempfile.TemporaryDirectory() as tmp:
        services = lab.start("target", sys.executable, str(ROOT / "tests/services.py"), "7200",
                             stdout=subprocess.PIPE)
        assert services.stdout.readline().strip() == b"ready"
        work = Path(tmp)
        contenders = [Portsentry12(lab, work), Portsentinel(lab, work, False),
                      Portsentinel(lab, work, True), ConfigUnchanged(lab, work)]
        if args.leak_trials:
            print(leak_table(lab, work, args.leak_trials))
            return
        if args.idle_only:
            if args.baseline:
                contenders.insert(2, baseline(Portsentinel(lab, work, True), args.baseline))
            print(idle_table(idle(lab, contenders, args.idle_only)))
            return
        if args.hold_only:
            import hold  # bench/hold.py, beside this file
            print(hold.measure(lab, work, 20, 200, [2000, 4000]))
            return
        if args.capacity_only:
            unlimited = Portsentinel(lab, work, False, 'BAN_RATE_LIMIT="0"\n')
            both = [unlimited] + ([baseline(Portsentinel(lab, work, False, 'BAN_RATE_LIMIT="0"\n'),
                                            args.baseline)] if args.baseline else [])
            rows = [row for _ in range(args.rounds) for rate in rates for c in both
                    for row in capacity(lab, c, [rate], args.flood_seconds)]
            # CPU a source handled: under one core at R sources a second needs < 1e6/R us
            print(table(["contender", "new sources/s", "sent", "alerted and banned",
                         "handled a second", "CPU % of a core", "CPU us a source", "RSS MiB"],
                        [[r["contender"], r["rate"], r["sent"], r["handled"],
                          f"{r['sustained']:.0f}", f"{r['cpu_pct']:.0f}",
                          f"{r['cpu_pct'] / 100 * r['wall'] * 1e6 / max(1, r['handled']):.0f}",
                          f"{r['rss_kb'] / 1024:.0f}"] for r in rows]))
            return
        if args.recon_only:
            print(recon_table(recon_compare(lab, work, args.only.split(",") if args.only
                                            else None)))
            return
        if args.sensor_compare:
            only = args.only.split(",") if args.only else None
            print(sensor_table(sensor_compare(lab, work, only)))
            return
        if args.flood_only:
            spoofed_flood(lab, contenders[2], 100_000 if args.quick else 1_000_000, 50_000)
            return
        if args.restart_only:
            rows = []
            for _ in range(3 if args.baseline else 1):  # turns taken: the machine is noisy
                for count in (0, 10000, 100000):
                    rows += state_load(lab, work, [count])
                    if args.baseline:
                        rows += state_load(lab, work, [count], args.baseline, "baseline")
            print(table(["contender", "stored bans", "launch to ready s", "restore s",
                         "in the kernel after"],
                        [[r["contender"], r["bans"], f"{r['ready_s']:.2f}",
                          f"{r['restore_s']:.2f}", r["in_kernel"]] for r in rows]))
            return
        if args.latency_only:
            latency = {c.name: [latency_trial(lab, c, args.gap, 400) for _ in range(args.trials)]
                       for c in contenders}
            print(latency_table(latency))
            return
        if args.scans_only:
            results = [run_scan(lab, contender, name, nmap_args, v6)
                       for name, nmap_args, v6 in scans for contender in contenders]
            latency = {c.name: [latency_trial(lab, c, args.gap, 400) for _ in range(args.trials)]
                       for c in contenders}
            print(scan_table(results))
            print()
            print(latency_table(latency))
            return
        results, latency = [], {}
        for name, nmap_args, v6 in scans:
            for contender in contenders:
                results.append(run_scan(lab, contender, name, nmap_args, v6))
        for contender in contenders:
            latency[contender.name] = [latency_trial(lab, contender, args.gap, 400)
                                       for _ in range(args.trials)]
            print(contender.name, latency[contender.name], flush=True)
        unlimited = Portsentinel(lab, work, False, 'BAN_RATE_LIMIT="0"\n')
        unlimited.name = "portsentinel userspace"
        cap = capacity(lab, unlimited, rates, args.flood_seconds)
        flood = spoofed_flood(lab, contenders[2], 100_000 if args.quick else 1_000_000, 50_000)
        load = state_load(lab, work, [0, 10000, 100000])
        text = report(results, latency, cap, load, flood, args)
        if args.output.exists() and "<!-- slow-scans -->" in args.output.read_text():
            kept = args.output.read_text().split("<!-- slow-scans -->", 1)[1]
            text += "\n<!-- slow-scans -->" + kept  # bench/trw.py's section
        args.output.write_text(text)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from portsentinel import config
from portsentinel.command_templates import command_argv
from portsentinel.config import ConfigError, parse, parse_port_list
from portsentinel.daemon.assembly import kernel_trap_armed

DEBIAN_LIKE = '''\
# comment
TCP_PORTS="1,11,15,79,111"
UDP_PORTS="1,7,9,69"
ADVANCED_PORTS_TCP="1024"
ADVANCED_PORTS_UDP="1024"
ADVANCED_EXCLUDE_TCP="113,139"
ADVANCED_EXCLUDE_UDP="520,138,137,67"
IGNORE_FILE="/etc/portsentry/portsentry.ignore"
HISTORY_FILE="/var/lib/portsentry/portsentry.history"
BLOCKED_FILE="/var/lib/portsentry/portsentry.blocked"
RESOLVE_HOST = "0"
BLOCK_UDP="0"
BLOCK_TCP="0"
KILL_ROUTE="/sbin/route add -host $TARGET$ reject"
KILL_HOSTS_DENY="ALL: $TARGET$ : DENY"
SCAN_TRIGGER="0"
'''


def test_reads_debian_style_config():
    c = parse(DEBIAN_LIKE, "conf")
    assert c.tcp_ports == (1, 11, 15, 79, 111)
    assert c.advanced_exclude_udp == {520, 138, 137, 67}
    assert c.block_tcp == 0 and c.resolve_host is False
    assert c.kill_route == "/sbin/route add -host $TARGET$ reject"
    assert c.nftables is True  # KILL_ROUTE set: it runs in addition to the nftables ban
    assert parse('BLOCK_NFTABLES="0"\n' + DEBIAN_LIKE).nftables is False  # 1.2's way, explicitly
    assert parse('BLOCK_NFTABLES="1"\n' + DEBIAN_LIKE).nftables is True


def test_kill_route_keeps_the_kernel_trap():
    c = parse('KILL_ROUTE="/sbin/iptables -I INPUT -s $TARGET$ -j DROP"\n')
    assert kernel_trap_armed(c, "tcp", "atcp") and kernel_trap_armed(c, "udp", "audp")
    assert not kernel_trap_armed(parse('BLOCK_NFTABLES="0"\n'), "tcp", "atcp")


def test_no_config_reads_portsentrys_own_file_when_it_exists(tmp_path, monkeypatch):
    conf = tmp_path / "portsentry.conf"
    monkeypatch.setattr(config, "DEFAULT_CONFIG", conf)
    assert config.load(None).source == config.EMBEDDED  # absent: the embedded default
    conf.write_text('BLOCK_TCP="1"\nKILL_ROUTE="/sbin/iptables -I INPUT -s $TARGET$ -j DROP"\n')
    c = config.load(None)
    assert c.source == str(conf) and c.kill_route and c.nftables
    modes = tmp_path / "default-portsentry"
    modes.write_text('TCP_MODE="stcp"\nUDP_MODE=""\n')
    monkeypatch.setattr(config, "DEFAULT_MODES_FILE", modes)
    assert config.resolve_modes(None, None, c, False) == ("stcp", None)  # Debian's file read
    # the embedded default (no file anywhere) does not read Debian's modes file
    assert config.resolve_modes(None, None, config.Config(), False) == ("atcp", "audp")


def test_embedded_default_is_safe(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_CONFIG", tmp_path / "absent.conf")
    c = config.load(None)
    assert (c.tcp_mode, c.udp_mode) == ("atcp", "audp")
    assert c.block_tcp == 1 and c.block_udp == 1
    assert c.nftables and c.kill_route is None
    assert c.ban_time > 0


def test_ranges_and_no_64_port_cap():
    ports = parse_port_list("1-1023, 8080,8081-8082")
    assert len(ports) == 1026 and ports[-1] == 8082
    assert len(parse(f'TCP_PORTS="{",".join(map(str, range(1, 200)))}"').tcp_ports) == 199


@pytest.mark.parametrize("text, message", [
    ('BLOCK_TCP=1', 'double quotes'),
    ('NOT_A_KEY="1"', 'unknown key NOT_A_KEY'),
    ('TCP_PORTS="1,70000"', 'outside 1-65535'),
    ('TCP_PORTS="1,x"', 'not a port'),
    ('TCP_PORTS="9-3"', 'backwards'),
    ('BLOCK_TCP="3"', 'must be 0'),
    ('KILL_ROUTE="/sbin/iptables -I INPUT -j DROP"', '$TARGET$'),
    ('KILL_ROUTE="/bin/echo $TARGET$ | /sbin/ipf -f -"', 'shell syntax'),
    ('KILL_RUN_CMD="/bin/x $TARGET$; rm -rf /"', 'shell syntax'),
    ('SCAN_TRIGGER="-1"', 'whole number'),
    ('BAN_TIME="soon"', 'duration'),
    ('BAN_TIME_BY_EVIDENCE="certain=1h"', 'grade=duration'),
    ('BAN_TIME_BY_EVIDENCE="single"', 'grade=duration'),
    ('BAN_TIME_BY_EVIDENCE="single=soon"', 'duration'),
    ('BAN_TIME_BY_EVIDENCE="single=1h single=2h"', 'given twice'),
    ('FLEET_SCAN_WINDOW="0"', 'shorter than 10 s'),
    ('FLEET_SCAN_TRIGGER="100"', 'at most 64'),
    ('FLEET_SCAN_TRIGGER="1"', 'at least 2 members'),
    ('this is not a config line', 'cannot read'),
    ('RESOLVE_HOST="0" trailing', 'after the closing quote'),
])
def test_bad_input_is_an_error_with_file_and_line(text, message):
    with pytest.raises(ConfigError) as err:
        parse(f"# ok\n\n{text}\n", "/etc/portsentry/portsentry.conf")
    assert str(err.value).startswith("/etc/portsentry/portsentry.conf:3: ")
    assert message in str(err.value)


def test_first_occurrence_wins_with_a_warning():
    c = parse('SCAN_TRIGGER="2"\nSCAN_TRIGGER="5"\n', "f")
    assert c.scan_trigger == 2
    assert "f:2: SCAN_TRIGGER repeats line 1" in c.warnings[0]


def test_durations():
    assert parse('BAN_TIME="90m"').ban_time == 5400
    assert parse('BAN_TIME="0"').ban_time == 0
    assert parse('SCAN_WINDOW="2h"').scan_window == 7200
    assert parse('').ban_time_by_evidence == ()
    assert parse('BAN_TIME_BY_EVIDENCE="single=1h, repeated=1d handshake=0"') \
        .ban_time_by_evidence == (("single", 3600), ("repeated", 86400), ("handshake", 0))


def test_comment_after_closing_quote_is_allowed():
    assert parse('SCAN_TRIGGER="3" # three ports').scan_trigger == 3


def test_command_argv_never_lets_a_token_add_arguments():
    argv = command_argv("/sbin/iptables -I INPUT -s $TARGET$ -j DROP", "198.51.100.2", 22, "atcp")
    assert argv == ["/sbin/iptables", "-I", "INPUT", "-s", "198.51.100.2", "-j", "DROP"]
    argv = command_argv("/bin/run '$TARGET$ $PORT$' $MODE$", "2001:db8::2", 22, "atcp")
    assert argv == ["/bin/run", "2001:db8::2 22", "atcp"]


def test_modes_file(tmp_path: Path):
    f = tmp_path / "portsentry"
    f.write_text('# Debian\nTCP_MODE="atcp"\nUDP_MODE=""\n')
    assert config.read_modes_file(f) == ("atcp", None)
    f.write_text('TCP_MODE="xtcp"\n')
    with pytest.raises(ConfigError, match=r":1: TCP_MODE"):
        config.read_modes_file(f)
    assert config.read_modes_file(tmp_path / "missing") == (None, None)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_any_text_gives_a_config_or_a_clear_error(text):
    try:
        result = parse(text, "fuzz.conf")
    except ConfigError as err:
        assert str(err).startswith("fuzz.conf:")
    else:
        assert isinstance(result, config.Config)


key_names = st.sampled_from(sorted(config.KEYS))
values = st.text(alphabet=st.characters(blacklist_characters='"\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029'),
                 max_size=40)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(key_names, values), max_size=8))
def test_any_assignments_give_a_config_or_a_clear_error(pairs):
    text = "\n".join(f'{k}="{v}"' for k, v in pairs)
    try:
        parse(text, "fuzz.conf")
    except ConfigError as err:
        assert str(err).startswith("fuzz.conf:")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789,- x", max_size=30))
def test_port_lists_give_ports_or_value_error(text):
    try:
        ports = parse_port_list(text)
    except ValueError:
        return
    assert all(1 <= p <= 65535 for p in ports)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "portsentinel.cli", *args],
                          capture_output=True, text=True)


def test_check_config_cli_reports_file_and_line(tmp_path: Path):
    conf = tmp_path / "portsentry.conf"
    conf.write_text('TCP_PORTS="1,2"\nBLOCK_TCP="9"\n')
    done = run_cli("check-config", "-c", str(conf))
    assert done.returncode == 1
    assert f"{conf}:2: BLOCK_TCP" in done.stderr
    assert "Traceback" not in done.stderr


def test_check_config_cli_missing_ignore_file_names_the_config_line(tmp_path: Path):
    conf = tmp_path / "portsentry.conf"
    conf.write_text(f'TCP_PORTS="1"\nIGNORE_FILE="{tmp_path}/nope.ignore"\n')
    done = run_cli("check-config", "-c", str(conf))
    assert done.returncode == 1
    assert f"{conf}:2: IGNORE_FILE" in done.stderr and "not found" in done.stderr


def test_check_config_cli_accepts_embedded_default():
    done = run_cli("check-config")
    assert done.returncode == 0, done.stderr
    assert "modes: tcp=atcp udp=audp" in done.stdout


def test_check_config_takes_the_arguments_the_unit_gives_run(tmp_path: Path):
    """The unit runs `check-config $PORTSENTINEL_ARGS` before `run ... $PORTSENTINEL_ARGS`:
    run's own options must not stop it."""
    done = run_cli("check-config", "-atcp", "--log", "syslog", "--pid-file",
                   str(tmp_path / "p.pid"), "--foreground")
    assert done.returncode == 0, done.stderr


def test_check_config_missing_config_file(tmp_path: Path):
    done = run_cli("check-config", "-c", str(tmp_path / "absent.conf"))
    assert done.returncode == 1 and "cannot read config" in done.stderr


def test_version_and_help():
    assert "PortSentry 1.2 compatible" in run_cli("--version").stdout
    help_text = run_cli("run", "--help").stdout
    assert "-atcp" in help_text and "--foreground" in help_text


def test_every_key_is_in_the_readme_reference():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert [k for k in config.KEYS if f"`{k}`" not in readme] == []


def test_control_commands_find_the_socket_in_the_config_given(tmp_path):
    conf = tmp_path / "portsentry.conf"
    conf.write_text(f'CONTROL_SOCKET="{tmp_path}/elsewhere.sock"\n')
    done = subprocess.run([sys.executable, "-m", "portsentinel.cli", "status", "-c", str(conf)],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert f"{tmp_path}/elsewhere.sock" in done.stderr


def test_an_ack_scan_needs_two_ports_at_least():
    """One late ACK is normal (connection tracking forgot the connection):
    ACK_SCAN_TRIGGER is 0 (off) or at least 2, never 1."""
    with pytest.raises(ConfigError, match="ACK_SCAN_TRIGGER.*never bans"):
        parse('ACK_SCAN_TRIGGER="1"\n', "test")
    assert parse('ACK_SCAN_TRIGGER="0"\n', "test").ack_scan_trigger == 0
    assert parse("", "test").ack_scan_trigger == 5


def test_an_ip_protocol_scan_needs_two_protocols_at_least():
    with pytest.raises(ConfigError, match="PROTO_SCAN_TRIGGER.*never bans"):
        parse('PROTO_SCAN_TRIGGER="1"\n', "test")
    assert parse("", "test").proto_scan_trigger == 4


def test_fleet_names_that_are_origins_are_reserved(tmp_path: Path):
    """A member named like an origin of this member's own bans would have its
    bans taken for theirs by every other member (and republished)."""
    for name in ("local", "cli", "kernel", "correlation"):
        conf = tmp_path / "p.conf"
        conf.write_text(f'FLEET_REDIS_URL="redis://192.0.2.1:6379/0"\nFLEET_NAME="{name}"\n')
        done = run_cli("check-config", "-c", str(conf))
        assert done.returncode == 1 and "is reserved" in done.stderr, (name, done.stderr)

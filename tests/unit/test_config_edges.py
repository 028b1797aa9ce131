"""Config edge cases that used to pass check-config and break at run time."""

import pytest

from portsentinel import config
from portsentinel.config import ConfigError


def test_a_comment_with_quotes_after_the_value_is_a_comment():
    c = config.parse('KILL_ROUTE="/sbin/iptables -I INPUT -s $TARGET$ -j DROP" # "x"\n')
    assert c.kill_route == "/sbin/iptables -I INPUT -s $TARGET$ -j DROP"


@pytest.mark.parametrize("value", ["9" * 400, "1e400", "200000d"])
def test_an_endless_duration_is_refused(value):
    with pytest.raises(ConfigError) as refused:
        config.parse(f'BAN_TIME="{value}"\n', "t.conf")
    assert "t.conf:1:" in str(refused.value)


def test_host_capacity_must_hold_a_host():
    with pytest.raises(ConfigError):
        config.parse('HOST_CAPACITY="0"\n')


def test_a_form_feed_does_not_shift_line_numbers():
    with pytest.raises(ConfigError) as refused:
        config.parse('# page one\f still a comment\nBLOCK_TCP="7"\n', "t.conf")
    assert str(refused.value).startswith("t.conf:2:")


def test_non_utf8_bytes_in_a_comment_are_fine_in_a_value_an_error_with_its_line(tmp_path):
    latin1 = tmp_path / "portsentry.conf"
    latin1.write_bytes('# réglages du tutoriel\nBLOCK_TCP="1"\n'.encode("latin-1"))
    assert config.load(latin1).block_tcp == 1
    latin1.write_bytes('BLOCK_TCP="1"\nPORT_BANNER="caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as refused:
        config.load(latin1)
    assert f"{latin1}:2:" in str(refused.value) and "UTF-8" in str(refused.value)


def test_control_commands_say_what_is_wrong_with_a_broken_default_config(
        tmp_path, monkeypatch, capsys):
    from portsentinel import cli
    broken = tmp_path / "portsentry.conf"
    broken.write_text('BLOCK_TCP="7"\n')
    monkeypatch.setattr(config, "DEFAULT_CONFIG", broken)
    assert cli.main(["status"]) == 2
    err = capsys.readouterr().err
    assert f"{broken}:1:" in err and "--socket" in err

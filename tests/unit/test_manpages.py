"""The man pages are made from the README (scripts/manpages.py): the
committed ones must be what it makes now, and name every config key."""

import re
import sys
from pathlib import Path

from portsentinel import config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import manpages  # noqa: E402


def test_the_committed_man_pages_are_made_from_the_readme(tmp_path):
    for made in manpages.make(tmp_path):
        committed = ROOT / "man" / made.name
        assert made.read_text() == committed.read_text(), \
            f"{committed} is stale: run python3 scripts/manpages.py"


def test_portsentry_conf_5_describes_every_key():
    page = (ROOT / "man" / "portsentry.conf.5").read_text()
    described = set(re.findall(r"\\fB([A-Z_]+)\\fR", page))
    described |= {f"{prefix}_UDP" for prefix in ("ADVANCED_PORTS", "ADVANCED_EXCLUDE")
                  if f"{prefix}_TCP" in described}  # the table's `ADVANCED_PORTS_TCP`, `_UDP`
    assert [key for key in config.KEYS if key not in described] == []


def test_portsentinel_8_has_the_sections_an_admin_looks_for():
    page = (ROOT / "man" / "portsentinel.8").read_text()
    for section in ("SYNOPSIS", "DESCRIPTION", "SIGNALS", "FILES", "EXIT STATUS", "SEE ALSO"):
        assert f".SH {section}\n" in page, section
    assert "portsentinel unblock" in page and "SIGHUP" in page

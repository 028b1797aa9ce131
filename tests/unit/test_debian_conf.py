"""Debian's shipped portsentry.conf, verbatim, from the real package.

scripts/test.sh unpacks Debian's portsentry .deb (never installs it) and sets
PORTSENTRY_DEB_ROOT. The check runs in a private mount namespace with an
overlay on /etc, so /etc/portsentry exists for it without touching the host.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEB_ROOT = os.environ.get("PORTSENTRY_DEB_ROOT")


def deb_root() -> Path:
    if not DEB_ROOT or not Path(DEB_ROOT, "etc/portsentry/portsentry.conf").exists():
        if os.environ.get("CI"):
            pytest.fail("PORTSENTRY_DEB_ROOT is not set up; run scripts/test.sh")
        pytest.skip("Debian's portsentry package not unpacked; run scripts/test.sh")
    return Path(DEB_ROOT)


def check_in_private_etc(tmp_path: Path, files: dict[str, str], *args: str):
    upper, work = tmp_path / "upper", tmp_path / "work"
    (upper / "portsentry").mkdir(parents=True)
    work.mkdir()
    for name, text in files.items():
        (upper / "portsentry" / name).write_text(text)
    script = (f"mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} /etc"
              f" && exec {sys.executable} -m portsentinel.cli check-config "
              + " ".join(args))
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def debian_files():
    root = deb_root() / "etc/portsentry"
    return {name: (root / name).read_text()
            for name in ("portsentry.conf", "portsentry.ignore.static")}


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root")
def test_check_config_accepts_debian_conf_verbatim(tmp_path, debian_files):
    done = check_in_private_etc(tmp_path, debian_files, "-c", "/etc/portsentry/portsentry.conf")
    assert done.returncode == 0, done.stderr
    assert "config: /etc/portsentry/portsentry.conf: OK" in done.stdout
    assert "BLOCK_TCP=0 BLOCK_UDP=0" in done.stdout  # Debian ships log-only


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root")
def test_check_config_rejects_broken_debian_conf_with_line(tmp_path, debian_files):
    lines = debian_files["portsentry.conf"].splitlines()
    number = next(i for i, line in enumerate(lines, 1) if line.startswith("BLOCK_TCP="))
    lines[number - 1] = 'BLOCK_TCP=1'  # quotes lost: 1.2 silently skipped this
    debian_files["portsentry.conf"] = "\n".join(lines) + "\n"
    done = check_in_private_etc(tmp_path, debian_files, "-c", "/etc/portsentry/portsentry.conf")
    assert done.returncode == 1
    assert f"/etc/portsentry/portsentry.conf:{number}: BLOCK_TCP" in done.stderr

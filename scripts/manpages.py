#!/usr/bin/env python3
"""portsentinel(8) and portsentry.conf(5), made from the README: its "Use"
section, configuration reference and log formats are the one source, so the
man pages cannot drift from it. `tests/unit/test_manpages.py` checks that the
committed pages are what this makes.

    python3 scripts/manpages.py [OUT_DIR]      # default: man/
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATE = "2026-12-03"  # the pages' date: changed by hand with their content


def sections(readme: str) -> dict[str, str]:
    """'## Title' -> its text; '' -> what comes before the first one."""
    found, title, lines = {}, "", []
    for line in readme.splitlines():
        if line.startswith("## "):
            found[title], title, lines = "\n".join(lines), line[3:].strip(), []
        elif not line.startswith("# "):
            lines.append(line)
    found[title] = "\n".join(lines)
    return found


def inline(text: str) -> str:
    """Markdown spans to roff: `code` and **bold** in bold, escapes."""
    text = text.replace("\\", "\\e")
    text = re.sub(r"`([^`]+)`", lambda m: "\\fB" + m[1].replace("-", "\\-") + "\\fR", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\\fB\1\\fR", text)
    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r"\1 (\2)", text)  # [text](link)


def _line(text: str) -> str:
    """A roff text line: one starting with . or ' would be a request."""
    return "\\&" + text if text[:1] in ".'" else text


def body(markdown: str) -> str:
    """Paragraphs, bullet lists and indented code blocks (tables are left
    to the caller)."""
    out, paragraph = [], []

    def flush():
        if paragraph:
            out.extend([".PP", _line(inline(" ".join(paragraph)))])
            paragraph.clear()
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("    ") and not paragraph:
            block = []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                block.append(lines[i][4:])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            out.extend([".PP", ".nf", ".RS 4", *(_line(b.replace("\\", "\\e")) for b in block),
                        ".RE", ".fi"])
            continue
        if not line.strip() or line.startswith("|"):
            flush()
        elif line.lstrip().startswith("- "):
            flush()
            item = [line.lstrip()[2:]]
            indent = len(line) - len(line.lstrip())
            while i + 1 < len(lines) and lines[i + 1].startswith(" " * (indent + 2)) \
                    and lines[i + 1].strip() and not lines[i + 1].lstrip().startswith("- "):
                i += 1
                item.append(lines[i].strip())
            out.extend([".IP \\(bu 2", _line(inline(" ".join(item)))])
        else:
            paragraph.append(line.strip())
        i += 1
    flush()
    return "\n".join(out)


def table_rows(markdown: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in markdown.splitlines() if line.startswith("|")]
    return [r for r in rows[2:] if len(r) == 3]  # past the header and its rule


def header(name: str, section: int, title: str) -> str:
    return (".\\\" -*- coding: UTF-8 -*-\n"  # preconv: the README's arrows and signs
            f'.TH {name.upper()} {section} "{DATE}" "portsentinel" "{title}"\n'
            ".SH NAME\n")


def conf_page(parts: dict[str, str]) -> str:
    reference = parts["Configuration reference"]
    before, _, _ = reference.partition("\n|")
    after = "\n".join(line for line in reference.rpartition("|\n")[2].splitlines()
                      if not line.startswith("|"))
    keys = "\n".join(f".TP\n{_line(inline(key))} (default: {inline(default)})\n"
                     f"{_line(inline(meaning))}" for key, default, meaning in table_rows(reference))
    return (header("portsentry.conf", 5, "File formats")
            + "portsentry.conf \\- portsentinel's configuration (PortSentry 1.2's format)\n"
            + ".SH SYNOPSIS\n/etc/portsentry/portsentry.conf\n"
            + ".SH DESCRIPTION\n" + body(before) + "\n"
            + ".SH KEYS\n" + keys + "\n"
            + ".SH COMMANDS, ACTIONS AND THE IGNORE FILES\n" + body(after) + "\n"
            + ".SH MODES\n" + body(parts["Modes"].partition("\n|")[0]) + "\n"
            + ".SH SEE ALSO\n.BR portsentinel (8)\n")


def daemon_page(parts: dict[str, str]) -> str:
    use = parts["Use"]
    files = [(key, default) for key, default, _ in table_rows(parts["Configuration reference"])
             if default.startswith("`/")]
    listed = "\n".join(f".TP\n{inline(default)}\n{inline(key)}" for key, default in files)
    return (header("portsentinel", 8, "System administration")
            + "portsentinel \\- port-scan detection and blocking, PortSentry 1.2 compatible\n"
            + ".SH SYNOPSIS\n" + body(use.partition("\n\n")[0] + "\n").split(".PP\n", 1)[-1]
            + "\n.SH DESCRIPTION\n" + body(parts[""]) + "\n" + body(use.partition("\n\n")[2])
            + "\n.SH FAULTS AND HOSTILE INPUT\n" + body(parts["Faults and hostile input"])
            + "\n.SH LOGS\n" + body(parts["Logs and files"])
            + "\n.SH SIGNALS\n.TP\nSIGTERM\nstop: the bans stay in the kernel with their "
            + "expiry, the kernel trap and the hold are taken out, the pid file is removed\n"
            + ".TP\nSIGHUP\nreload the configuration and the ignore files, as "
            + "\\fBportsentinel reload\\fR does\n"
            + "\n.SH FILES\n.TP\n/etc/portsentry/portsentry.conf\nthe configuration, "
            + "read when no \\fB\\-c\\fR is given\n"
            + ".TP\n/etc/portsentry/portsentry.ignore, portsentry.ignore.static\n"
            + "addresses and CIDRs never blocked (IGNORE_FILE and the static file beside it)\n"
            + ".TP\n/etc/default/portsentry\nTCP_MODE and UDP_MODE when neither the command "
            + "line nor the config gives a mode (Debian's file)\n"
            + ".TP\n/etc/default/portsentinel\nPORTSENTINEL_ARGS: the systemd unit's arguments "
            + "to check-config and run\n"
            + ".TP\n/run/portsentinel.pid\nthe daemon's pid file (--pid-file)\n" + listed
            + "\n.SH EXIT STATUS\n0 when the command did what was asked; 1 on any error, "
            + "said on standard error (a bad configuration names \\fIfile\\fR:\\fIline\\fR; "
            + "a daemon already running; a control socket that does not answer).\n"
            + ".SH SEE ALSO\n.BR portsentry.conf (5),\n.BR nft (8)\n")


def make(out: Path) -> list[Path]:
    parts = sections((ROOT / "README.md").read_text())
    out.mkdir(parents=True, exist_ok=True)
    pages = {"portsentinel.8": daemon_page(parts), "portsentry.conf.5": conf_page(parts)}
    for name, text in pages.items():
        (out / name).write_text(text)
    return [out / name for name in pages]


if __name__ == "__main__":
    for path in make(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "man"):
        print(path)

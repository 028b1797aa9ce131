"""Command templates of PortSentry's block actions (KILL_ROUTE, KILL_ROUTE_UNDO,
KILL_RUN_CMD, KILL_HOSTS_DENY): filled with $TARGET$, $PORT$ and $MODE$,
split into argv (never a shell), undone, and matched to an address family."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil


def command_argv(template: str, target: str, port: int, mode: str) -> list[str]:
    """Split a command template, then fill the tokens in each argument.

    Splitting first means a token's value can never add or merge arguments;
    `target` must already be a validated IP address string.
    """
    values = {"$TARGET$": target, "$PORT$": str(port), "$MODE$": mode}
    argv = []
    for arg in shlex.split(template):
        for token, value in values.items():
            arg = arg.replace(token, value)
        argv.append(arg)
    return argv


def undo_command(command: str) -> str | None:
    """The command that reverses a KILL_ROUTE (template or filled), if known:
    iptables/ip6tables -I/-A -> -D, route add -> route del, ip route add -> del."""
    argv = shlex.split(command)
    program = argv[0].rsplit("/", 1)[-1]
    if program.startswith(("iptables", "ip6tables")):
        for flag in ("-I", "--insert", "-A", "--append"):
            if flag in argv[:-1]:
                i = argv.index(flag)
                rest = argv[i + 2:]
                if flag in ("-I", "--insert") and rest and rest[0].isdigit():
                    rest = rest[1:]  # -I INPUT 1 ...: the position is not part of -D
                return shlex.join([*argv[:i], "-D", argv[i + 1], *rest])
        return None
    if program == "route" and "add" in argv:
        return shlex.join([a if a != "add" else "del" for a in argv])
    if program == "ip" and "route" in argv and "add" in argv:
        return shlex.join([a if a != "add" else "del" for a in argv])
    return None


def fill(template: str, target: str, port: int, mode: str) -> str:
    for token, value in (("$TARGET$", target), ("$PORT$", str(port)), ("$MODE$", mode)):
        template = template.replace(token, value)
    return template


# -- address families: KILL_ROUTE was written for 1.2, which only ever gave it IPv4
IPTABLES_PROGRAM = re.compile(r"^ip(6?)tables(-legacy|-nft)?$")


def command_family(argv: list[str]) -> int | None:
    """4 or 6 when the command takes addresses of one family only, None when
    it takes both. iptables -> 4, ip6tables -> 6, net-tools route -> 4 (6 with
    `-A inet6`), `ip` -> both (unless -4/-6), anything else -> 4: a 1.2 command
    never saw an IPv6 address."""
    program = argv[0].rsplit("/", 1)[-1]
    args = argv[1:]
    match = IPTABLES_PROGRAM.match(program)
    if match:
        return 6 if match[1] else 4
    if program == "ip":
        for i, arg in enumerate(args):
            if arg in ("-4", "-6"):
                return int(arg[1])
            if arg in ("-f", "-family") and i + 1 < len(args):
                return {"inet": 4, "inet6": 6}.get(args[i + 1])
        return None
    if program == "route":
        inet6 = "-6" in args or "--inet6" in args or any(
            a in ("-A", "--family") and b == "inet6" for a, b in itertools.pairwise(args))
        return 6 if inet6 else 4
    return 4


def kill_route_for(template: str, version: int) -> str | None:
    """The KILL_ROUTE (or KILL_ROUTE_UNDO) template to run for an address of
    IP `version`: the template itself when it takes that family; for
    iptables <-> ip6tables the other program in the same directory, if it
    exists there; None when the command cannot take such an address."""
    argv = shlex.split(template)
    family = command_family(argv)
    if family is None or family == version:
        return template
    program = argv[0]
    match = IPTABLES_PROGRAM.match(program.rsplit("/", 1)[-1])
    if not match:
        return None
    other = ("ip6tables" if version == 6 else "iptables") + (match[2] or "")
    if "/" in program:
        candidate = f"{program.rsplit('/', 1)[0]}/{other}"
        if not os.access(candidate, os.X_OK):
            return None
    else:
        candidate = other
        if not shutil.which(other):
            return None
    stripped = template.lstrip()
    if stripped.startswith(program):  # keep the rest exactly as written
        return candidate + stripped[len(program):]
    return shlex.join([candidate, *argv[1:]])

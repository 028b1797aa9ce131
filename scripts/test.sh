#!/usr/bin/env bash
# Run the whole test suite (unit + end-to-end in network namespaces), as root
# on Debian 12. Installs what it needs first. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in nft:nftables iptables:iptables nmap:nmap ip:iproute2 fail2ban-regex:fail2ban \
            redis-server:redis-server openssl:openssl \
            unshare:util-linux systemd-analyze:systemd; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
# the Debian package's build (tests/e2e/test_package.py)
for pkg in dpkg-dev debhelper dh-python python3-all python3-setuptools pybuild-plugin-pyproject; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
    echo "installing: ${need[*]}"
    # Never let a package start its service here (fail2ban would guard the host).
    policy=/usr/sbin/policy-rc.d
    ours=0
    [[ -e $policy ]] || { printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; ours=1; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    ((ours)) && rm -f "$policy"  # not a trap on EXIT: the exec below would skip it
fi

# Debian's PortSentry 1.2 package, unpacked (never installed): its shipped
# config for the compatibility tests and its binary for the benchmark.
deb=.cache/portsentry
if [[ ! -x $deb/root/usr/sbin/portsentry ]]; then
    mkdir -p "$deb"
    (cd "$deb" && rm -f ./*.deb && apt-get download portsentry >/dev/null 2>&1 || {
        apt-get update -qq && apt-get download portsentry >/dev/null; })
    dpkg-deb -x "$deb"/portsentry_*.deb "$deb/root"
fi
export PORTSENTRY_DEB_ROOT="$PWD/$deb/root"

[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
exec .venv/bin/python -m pytest -q "$@"

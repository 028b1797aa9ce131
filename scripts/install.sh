#!/usr/bin/env bash
# Install portsentinel on Debian 12 as root and start it.
#   bash scripts/install.sh                      # /etc/portsentry/portsentry.conf if it exists, else the embedded default (atcp+audp, nftables)
#   bash scripts/install.sh /etc/portsentry/portsentry.conf   # your PortSentry config
#   bash scripts/install.sh --no-start [CONFIG]               # install, check, do not start
set -euo pipefail
cd "$(dirname "$0")/.."
start=1
if [[ ${1:-} == --no-start ]]; then start=0; shift; fi
config=${1:-}
if [[ -n $config ]]; then
    config=$(realpath "$config")
fi

packages=(python3 python3-venv nftables iproute2)
if ! dpkg -s "${packages[@]}" >/dev/null 2>&1; then  # skipped when all are installed
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${packages[@]}" >/dev/null
fi
python3 -m venv /opt/portsentinel
/opt/portsentinel/bin/pip install -q --disable-pip-version-check .
ln -sf /opt/portsentinel/bin/portsentinel /usr/local/sbin/portsentinel

args=()
[[ -n $config ]] && args=(-c "$config")
portsentinel check-config "${args[@]}"

install -D -m 0644 packaging/portsentinel.service /etc/systemd/system/portsentinel.service
[[ -e /etc/default/portsentinel ]] || printf 'PORTSENTINEL_ARGS="%s"\n' "${args[*]}" \
    >/etc/default/portsentinel
install -D -m 0644 packaging/portsentinel.logrotate /etc/logrotate.d/portsentinel
install -D -m 0644 README.md /opt/portsentinel/README.md

if ((start == 0)); then
    echo "installed; start with: systemctl enable --now portsentinel (or: portsentinel run ${args[*]})"
elif [[ -d /run/systemd/system ]]; then
    # Type=notify: restart returns once the daemon is armed, or fails with its error
    systemctl daemon-reload
    systemctl enable portsentinel
    systemctl restart portsentinel
    systemctl --no-pager status portsentinel | head -5
else  # no systemd (a container): run it as a classic daemon
    pid_file=/run/portsentinel.pid
    alive() { [[ -e /proc/$1/status ]] && ! grep -q '^State:.*zombie' "/proc/$1/status"; }
    if [[ -s $pid_file ]]; then  # installed again: restart the running daemon (by its pid)
        pid=$(<"$pid_file")
        if [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" && grep -qa portsentinel "/proc/$pid/cmdline"; then
            echo "stopping the running portsentinel (pid $pid)"
            kill -TERM "$pid"
            for _ in $(seq 150); do alive "$pid" || break; sleep 0.1; done
        fi
    fi
    # returns once the daemon is armed; a start-up error is printed, exit status 1
    portsentinel run "${args[@]}"
    echo "portsentinel started (pid $(cat "$pid_file"))"
fi

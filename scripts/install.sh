#!/usr/bin/env bash
# Installs turnserver as a systemd service:
#   /usr/local/bin/turnserver              the binary (built here with cargo unless --binary)
#   /etc/turnserver.toml                   from turnserver.toml.example, only if absent
#                                          (mode 0640, owner root, group turnserver)
#   /etc/systemd/system/turnserver.service the unit
#   user and group "turnserver"            a system account without a shell or home
# then reloads systemd and, with --start, enables and starts the service.
#
#   scripts/install.sh [--binary PATH] [--destdir DIR] [--start]
#
# --destdir DIR installs under DIR (for packaging and tests): no account is created and systemd
# is not touched.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
binary=""
destdir=""
start=0
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary="$2"; shift 2 ;;
        --destdir) destdir="$2"; shift 2 ;;
        --start) start=1; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

if [ -z "$binary" ]; then
    (cd "$here" && cargo build --release --locked)
    binary="$here/target/release/turnserver"
fi
[ -x "$binary" ] || { echo "install.sh: $binary is not an executable" >&2; exit 1; }
if [ -z "$destdir" ] && [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (or use --destdir)" >&2
    exit 1
fi

install -D -m 0755 "$binary" "$destdir/usr/local/bin/turnserver"
install -D -m 0644 "$here/systemd/turnserver.service" \
    "$destdir/etc/systemd/system/turnserver.service"

if [ -z "$destdir" ] && ! getent passwd turnserver >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin turnserver
fi

config="$destdir/etc/turnserver.toml"
if [ -e "$config" ]; then
    echo "install.sh: keeping the existing $config"
else
    install -D -m 0640 "$here/turnserver.toml.example" "$config"
    if [ -z "$destdir" ]; then
        chgrp turnserver "$config"
    fi
    echo "install.sh: wrote $config from the example: set listening-ips, relay-ips, realm and users"
fi

"$destdir/usr/local/bin/turnserver" --check-config --config "$config" >/dev/null

if [ -z "$destdir" ]; then
    systemctl daemon-reload
    if [ "$start" -eq 1 ]; then
        systemctl enable --now turnserver
        systemctl --no-pager status turnserver || true
    else
        echo "install.sh: installed; start with: systemctl enable --now turnserver"
    fi
fi

#!/usr/bin/env bash
# A private OpenSSH server on 127.0.0.1 for reflow's SSH transport tests.
#
#   tests/cluster/sshd.sh install           install openssh-server if missing (needs root and apt-get)
#   tests/cluster/sshd.sh start DIR PORT    keys, authorized_keys, known_hosts and sshd_config in DIR; start sshd
#   tests/cluster/sshd.sh stop DIR          stop the sshd started from DIR (by its pid file) and wait until gone
#   tests/cluster/sshd.sh status DIR        exit 0 when that sshd runs and accepts connections
#
# Everything lives in DIR: the host key, a user key (DIR/id_ed25519), the
# authorized_keys the server reads (AuthorizedKeysFile points into DIR, so
# ~/.ssh is never touched), a known_hosts naming [127.0.0.1]:PORT for clients,
# the pid file and the log (DIR/sshd.log). Idempotent: start on a running
# server only checks it; keys are generated once and kept.
# Client:  ssh -p PORT -i DIR/id_ed25519 -o UserKnownHostsFile=DIR/known_hosts 127.0.0.1 true
set -euo pipefail

HOST=127.0.0.1
SSHD=/usr/sbin/sshd

say() { echo "sshd.sh: $*" >&2; }
die() { say "$*"; exit 1; }

usage() {
    sed -n '2,7p' "$0" >&2
    exit 2
}

port_open() { # port_open PORT: something accepts TCP connections on 127.0.0.1:PORT
    (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

pid_of() { # pid_of DIR: the pid in DIR/sshd.pid when that process is alive
    local pidfile=$1/sshd.pid pid
    [ -s "$pidfile" ] || return 1
    pid=$(cat "$pidfile")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

install() {
    if [ -x "$SSHD" ] && command -v ssh-keygen >/dev/null 2>&1; then
        say "openssh-server already installed"
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "openssh-server is missing and installing it needs root"
    command -v apt-get >/dev/null 2>&1 || die "openssh-server is missing and there is no apt-get to install it"
    say "installing openssh-server"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq openssh-server openssh-client >/dev/null
    [ -x "$SSHD" ] || die "openssh-server installed but $SSHD is missing"
}

write_config() { # write_config DIR PORT
    local dir=$1 port=$2 user
    user=$(id -un)
    if [ ! -s "$dir/host_ed25519" ]; then
        ssh-keygen -q -t ed25519 -N "" -C "reflow-test-host" -f "$dir/host_ed25519"
    fi
    if [ ! -s "$dir/id_ed25519" ]; then
        ssh-keygen -q -t ed25519 -N "" -C "reflow-test-user" -f "$dir/id_ed25519"
    fi
    chmod 600 "$dir/host_ed25519" "$dir/id_ed25519"
    # AuthorizedKeysFile points here; with StrictModes yes sshd would also insist on
    # the ownership/modes of every parent of DIR (often a shared /tmp): turn it off,
    # and still keep the file itself private.
    cp "$dir/id_ed25519.pub" "$dir/authorized_keys"
    chmod 600 "$dir/authorized_keys"
    echo "[$HOST]:$port $(cut -d' ' -f1,2 "$dir/host_ed25519.pub")" >"$dir/known_hosts"
    cat >"$dir/sshd_config" <<EOF
# Written by tests/cluster/sshd.sh for reflow's tests; user $user.
ListenAddress $HOST
Port $port
PidFile $dir/sshd.pid
HostKey $dir/host_ed25519
AuthorizedKeysFile $dir/authorized_keys
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
UseDNS no
MaxSessions 10
MaxStartups 100:30:200
LoginGraceTime 30
ClientAliveInterval 0
X11Forwarding no
AllowTcpForwarding yes
PrintMotd no
PrintLastLog no
LogLevel VERBOSE
Subsystem sftp internal-sftp
EOF
}

start() { # start DIR PORT
    [ $# = 2 ] || usage
    local dir port pid
    mkdir -p "$1"
    dir=$(cd "$1" && pwd)
    port=$2
    [ -x "$SSHD" ] || die "$SSHD is missing: run '$0 install' first"
    if pid=$(pid_of "$dir") && port_open "$port" && grep -q "^Port $port\$" "$dir/sshd_config" 2>/dev/null; then
        say "already running (pid $pid) on $HOST:$port"
        return 0
    fi
    if pid=$(pid_of "$dir"); then # running with another port: restart
        stop "$dir"
    fi
    if port_open "$port"; then
        die "port $port on $HOST is already taken by another process"
    fi
    write_config "$dir" "$port"
    mkdir -p /run/sshd
    chmod 755 /run/sshd
    "$SSHD" -t -f "$dir/sshd_config" || die "sshd rejects $dir/sshd_config"
    "$SSHD" -f "$dir/sshd_config" -E "$dir/sshd.log"
    local end=$((SECONDS + 20))
    until port_open "$port"; do
        if [ $SECONDS -ge $end ]; then
            tail -n 20 "$dir/sshd.log" >&2 2>/dev/null || true
            die "sshd did not accept connections on $HOST:$port within 20 s"
        fi
        sleep 0.1
    done
    say "sshd running (pid $(pid_of "$dir" || echo '?')) on $HOST:$port; user key $dir/id_ed25519, known_hosts $dir/known_hosts"
}

stop() { # stop DIR
    [ $# = 1 ] || usage
    local dir=$1 pid
    if ! pid=$(pid_of "$dir"); then
        say "not running"
        rm -f "$dir/sshd.pid"
        return 0
    fi
    # The listener only: per-connection children notice their peer is gone or
    # are killed by the tests themselves (an orderly stop of a real server also
    # leaves established sessions alone).
    kill -TERM "$pid" 2>/dev/null || true
    local end=$((SECONDS + 20))
    while kill -0 "$pid" 2>/dev/null; do
        if [ $SECONDS -ge $end ]; then
            say "sshd (pid $pid) ignores SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            end=$((SECONDS + 10))
        fi
        sleep 0.1
    done
    rm -f "$dir/sshd.pid"
    say "stopped (pid $pid)"
}

status() { # status DIR
    [ $# = 1 ] || usage
    local dir=$1 pid port
    port=$(sed -n 's/^Port //p' "$dir/sshd_config" 2>/dev/null || true)
    if pid=$(pid_of "$dir") && [ -n "$port" ] && port_open "$port"; then
        echo "running pid=$pid port=$port"
        return 0
    fi
    echo "stopped"
    return 1
}

cmd=${1:-}
[ -n "$cmd" ] || usage
shift
case "$cmd" in
    install) install "$@" ;;
    start) start "$@" ;;
    stop) stop "$@" ;;
    status) status "$@" ;;
    *) usage ;;
esac

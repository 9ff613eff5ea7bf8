#!/usr/bin/env bash
# A real single-node Slurm cluster for reflow's tests, from Debian's packages.
#
#   tests/cluster/slurm.sh install               install slurm-wlm, munge, slurmdbd, mariadb-server if missing
#   tests/cluster/slurm.sh start [--accounting]  configure and start (switches mode if needed); idempotent
#   tests/cluster/slurm.sh stop                  stop every daemon (packages stay)
#   tests/cluster/slurm.sh status                print the mode; exit 0 when the node takes jobs
#
# Plain mode has no accounting (sacct has nothing to say, as on small sites);
# --accounting adds slurmdbd on a local MariaDB so sacct works and accounts are
# enforced, as on most real sites. Needs root and no systemd (checked on Debian 12).
set -euo pipefail

# Run as `flock LOCK slurm.sh start`, we inherit the lock's descriptor, and so would every daemon started here:
# munged keeps its descriptors, and would hold the machine-wide cluster lock for as long as it lives. Close them
# (flock itself keeps the lock until we exit; 255 is bash's own descriptor for this script).
for fd in /proc/$$/fd/*; do
    fd=${fd##*/}
    if [ "$fd" -gt 2 ] && [ "$fd" -lt 255 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
done

CLUSTER=reflowtest
CONF=/etc/slurm
MARK_DIR=/var/lib/reflow-test-slurm
LOGS=/var/log/slurm
NODE=$(hostname -s)
DB_PASS=reflow-test-slurmdbd

say() { echo "slurm.sh: $*" >&2; }
die() { say "$*"; exit 1; }
need_root() { [ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts system daemons)"; }

wait_until() { # wait_until SECONDS WHAT COMMAND...
    local limit=$1 what=$2; shift 2
    local end=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $end ] || { say "timed out after ${limit}s waiting for $what"; return 1; }
        sleep 0.5
    done
}

install() {
    need_root
    local missing=0
    for bin in slurmctld slurmd sbatch munged slurmdbd mysqld_safe; do
        command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing=1
    done
    if [ $missing = 0 ]; then say "packages already installed"; return 0; fi
    say "installing slurm-wlm munge slurmdbd mariadb-server"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge slurmdbd mariadb-server >/dev/null
}

start_munge() {
    mkdir -p /etc/munge /var/run/munge /var/log/munge /var/lib/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key /etc/munge /var/run/munge /var/log/munge /var/lib/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0700 /etc/munge
    chmod 0755 /var/run/munge
    if ! pgrep -x munged >/dev/null; then
        runuser -u munge -- /usr/sbin/munged
    fi
    wait_until 20 "munge" bash -c 'munge -n | unmunge'
}

node_line() {
    # NodeName=... CPUs=... RealMemory=...; drop the UpTime line slurmd -C prints.
    slurmd -C | head -n 1
}

write_slurm_conf() { # write_slurm_conf plain|accounting
    mkdir -p "$CONF" "$LOGS" /var/spool/slurmctld /var/spool/slurmd
    render_slurm_conf "$1" >"$CONF/slurm.conf"
}

conf_is_current() { # conf_is_current MODE: slurm.conf is what this script writes for MODE (not an older version)
    local want rc=0
    want=$(mktemp)
    render_slurm_conf "$1" >"$want"
    cmp -s "$want" "$CONF/slurm.conf" || rc=1
    rm -f "$want"
    return $rc
}

render_slurm_conf() { # render_slurm_conf plain|accounting
    local mode=$1 acct_type=accounting_storage/none gather=jobacct_gather/none enforce=""
    if [ "$mode" = accounting ]; then
        acct_type=accounting_storage/slurmdbd
        gather=jobacct_gather/linux
        enforce="AccountingStorageEnforce=associations"
    fi
    cat <<EOF
# Written by reflow's tests/cluster/slurm.sh ($mode mode).
ClusterName=$CLUSTER
SlurmctldHost=$NODE
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
ReturnToService=2
SlurmUser=root
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=$acct_type
AccountingStorageHost=localhost
$enforce
JobCompType=jobcomp/none
JobAcctGatherType=$gather
MinJobAge=300
MaxArraySize=1001
KillWait=5
OverTimeLimit=0
InactiveLimit=0
MessageTimeout=10
$(node_line) State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
PartitionName=drained Nodes=$NODE Default=NO MaxTime=INFINITE State=DOWN
PartitionName=short Nodes=$NODE Default=NO MaxTime=2 MaxMemPerNode=1000 State=UP OverSubscribe=FORCE:4
EOF
}

start_mariadb() {
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    if ! mysqladmin ping >/dev/null 2>&1; then
        (nohup mysqld_safe --user=mysql --bind-address=127.0.0.1 >"$LOGS/mariadb.log" 2>&1 &)
        wait_until 60 "MariaDB" mysqladmin ping
    fi
    mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
              CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
}

start_slurmdbd() {
    cat >"$CONF/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$LOGS/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    chmod 0600 "$CONF/slurmdbd.conf"
    if ! pgrep -x slurmdbd >/dev/null; then
        slurmdbd
    fi
    wait_until 60 "slurmdbd" sacctmgr -n list cluster
    sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true
    sacctmgr -i -Q add account reflowtest_acct Cluster="$CLUSTER" Description=tests Organization=reflow >/dev/null 2>&1 || true
    sacctmgr -i -Q add user root Account=reflowtest_acct Cluster="$CLUSTER" >/dev/null 2>&1 || true
}

stop_daemon() { # stop_daemon NAME
    if pgrep -x "$1" >/dev/null; then
        pkill -x "$1" || true
        wait_until 30 "$1 to stop" bash -c "! pgrep -x $1" || pkill -9 -x "$1" || true
    fi
}

node_usable() {
    local state
    state=$(sinfo -h -n "$NODE" -p debug -o %t 2>/dev/null | head -n 1)
    case "$state" in idle*|mix*|alloc*|comp*) return 0 ;; esac
    return 1
}

current_mode() { cat "$MARK_DIR/mode" 2>/dev/null || echo none; }

start() {
    need_root
    local mode=plain
    [ "${1:-}" = "--accounting" ] && mode=accounting
    install
    start_munge
    if [ "$(current_mode)" = "$mode" ] && pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null \
        && node_usable && conf_is_current "$mode"; then
        say "already running in $mode mode"
        return 0
    fi
    stop_daemon slurmctld
    write_slurm_conf "$mode"  # sacctmgr reads it to find slurmdbd
    if [ "$mode" = accounting ]; then
        start_mariadb
        start_slurmdbd
    else
        stop_daemon slurmdbd
    fi
    mkdir -p "$MARK_DIR"
    echo "$mode" >"$MARK_DIR/mode"
    slurmctld
    wait_until 60 "slurmctld" scontrol ping
    if pgrep -x slurmd >/dev/null; then
        scontrol reconfigure >/dev/null 2>&1 || true
    else
        slurmd
    fi
    if ! wait_until 60 "the node to come up" node_usable; then
        scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
        wait_until 30 "the node to come up" node_usable || {
            sinfo >&2 || true
            tail -n 30 "$LOGS/slurmctld.log" "$LOGS/slurmd.log" >&2 || true
            die "the node did not become usable"
        }
    fi
    if [ "$mode" = accounting ]; then
        wait_until 60 "sacct" sacct -n -X -S now-1hour
    fi
    # Jobs slurmctld restored from its state directory belong to nobody now (an earlier, interrupted run of
    # the tests or a previous machine set-up): they would hold the node's slots, so they go.
    local stale
    stale=$(squeue -h -o %i 2>/dev/null | sort -u | tr '\n' ' ')
    if [ -n "${stale// /}" ]; then
        say "cancelling jobs left from an earlier run: $stale"
        # shellcheck disable=SC2086
        scancel $stale || true
    fi
    say "running in $mode mode"
}

stop() {
    need_root
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon slurmdbd
    if mysqladmin ping >/dev/null 2>&1; then mysqladmin shutdown || true; fi
    rm -f "$MARK_DIR/mode"
    say "stopped"
}

status() {
    echo "mode: $(current_mode)"
    for d in munged slurmctld slurmd slurmdbd; do
        if pgrep -x "$d" >/dev/null; then echo "$d: running"; else echo "$d: stopped"; fi
    done
    node_usable
}

case "${1:-}" in
    install) install ;;
    start) shift; start "$@" ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 install | start [--accounting] | stop | status" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A real single-node Son of Grid Engine 8.1.9 for reflow's tests (Debian 12's
# gridengine-master/-exec/-client), as root, without systemd. Built from the checked
# recipe in shared/notes/sge-on-one-machine.{md,sh}; see there for why each step exists.
#
#   tests/cluster/sge.sh install   # apt-get install if missing, then everything "start" does
#   tests/cluster/sge.sh start     # host files, qmaster + execd, configuration, test job; idempotent
#   tests/cluster/sge.sh stop      # stop execd (and the jobs it runs) and qmaster
#   tests/cluster/sge.sh status    # daemons, qstat -f; exit 0 only if both daemons answer
#   tests/cluster/sge.sh clean     # delete every job (leftovers of earlier test runs)
#
# Safe to run twice, and it takes over a machine holding state from earlier runs: a qmaster
# started without host_aliases is restarted, configuration is written again when it differs,
# jobs left by an earlier run are deleted, and an accounting file grown past 20 MB is rotated
# (qacct reads the whole file on every call). A second "start" on a running, configured
# cluster only checks it (well under a second).
# It never touches /etc/hosts, Slurm, or anything but the two SGE daemons it started.
#
# Knobs (environment): SGE_SLOTS (slots of all.q, default: 4 per core -- the test jobs are
# tiny and mostly wait, so oversubscribing keeps a fan-out from queueing behind 2 slots),
# SGE_SMOKE_TIMEOUT (s, default 60).
set -Eeuo pipefail
trap 'echo "sge.sh: ERROR: command failed (line $LINENO): $BASH_COMMAND" >&2' ERR

export SGE_ROOT=/var/lib/gridengine   # Debian's fixed SGE_ROOT (the /usr/bin/q* wrappers default to it)
export SGE_CELL=default
COMMON="$SGE_ROOT/$SGE_CELL/common"
SPOOL=/var/spool/gridengine           # Debian's spool root: qmaster/, spooldb/ (BerkeleyDB), execd/
UTIL=/usr/lib/gridengine              # gethostname, gethostbyaddr, ... (SGE's own resolver view)
ADMIN=sgeadmin                        # created by gridengine-common's postinst
PKGS=(gridengine-master gridengine-exec gridengine-client)
SLOTS="${SGE_SLOTS:-$(( 4 * $(nproc) ))}"
SMOKE_TIMEOUT="${SGE_SMOKE_TIMEOUT:-60}"

log() { printf 'sge.sh: %s\n' "$*" >&2; }
die() { printf 'sge.sh: ERROR: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"

# ---------------------------------------------------------------- install
pkgs_installed() {
  local p
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || return 1
  done
}

install_pkgs() {
  if pkgs_installed; then log "packages already installed"; return; fi
  # Preseed debconf. Without it a noninteractive install leaves act_qmaster EMPTY
  # (shared/gridenginemaster has no default), and with gridengineconfig=false the
  # master postinst would not run init_cluster (no spool DB, no bootstrap, no settings.sh).
  local h; h=$(hostname)
  local p
  for p in gridengine-common gridengine-client gridengine-master gridengine-exec; do
    printf '%s shared/gridengineconfig boolean true\n%s shared/gridenginecell string %s\n%s shared/gridenginemaster string %s\n' \
      "$p" "$p" "$SGE_CELL" "$p" "$h"
  done | debconf-set-selections
  # The postinsts call invoke-rc.d to start the daemons (and exim4, pulled in through
  # bsd-mailx -> default-mta). We start SGE ourselves, after host_aliases exists, so
  # forbid service starts during the install unless a policy-rc.d already does that.
  local made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  log "apt-get update + install ${PKGS[*]} (about 30-60 s)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PKGS[@]}" \
    || { [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d; die "apt-get install failed"; }
  [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d
  return 0
}

# init_cluster is what gridengine-master's postinst runs on a first install with
# gridengineconfig=true. Run it here if that did not happen (e.g. an earlier unpreseeded
# install, or a purge of /var/spool/gridengine). It skips itself when spooldb/sge exists.
init_cluster_if_needed() {
  local d
  for d in "$SGE_ROOT" "$SGE_ROOT/$SGE_CELL" "$COMMON" "$SPOOL/qmaster" "$SPOOL/qmaster/job_scripts" \
           "$SPOOL/spooldb" "$SPOOL/execd"; do
    mkdir -p "$d"; chown "$ADMIN:$ADMIN" "$d"; chmod 755 "$d"
  done
  [ -s "$COMMON/bootstrap" ] || install -m0644 -o "$ADMIN" -g "$ADMIN" /usr/share/gridengine/default-bootstrap "$COMMON/bootstrap"
  if [ ! -e "$SPOOL/spooldb/sge" ]; then
    log "initialising the cluster spool (init_cluster)"
    su -s /bin/sh -c "/usr/share/gridengine/scripts/init_cluster $SGE_ROOT $SGE_CELL $SPOOL/spooldb $ADMIN" "$ADMIN"
  fi
}

# ---------------------------------------------------------------- host names
# SGE's name for this host: gethostname() resolved through the resolver (NOT aliased).
sge_host() { "$UTIL/gethostname" -name; }

write_host_files() {
  local host ip rev aliases
  host=$(sge_host)
  [ -n "$host" ] || die "gethostname -name returned nothing"
  # act_qmaster: where clients and execd look for the qmaster. Noninteractive installs
  # without preseeding leave it empty.
  echo "$host" > "$COMMON/act_qmaster"; chown "$ADMIN:$ADMIN" "$COMMON/act_qmaster"
  # THE key fix. Here /etc/hosts maps "127.0.0.1 localhost" first and "127.0.0.1 vm" later:
  # the client says it is "vm", but the qmaster reverse-resolves the peer 127.0.0.1 to
  # "localhost" and refuses it ("client IP resolved to host name localhost, not identical
  # to vm"). host_aliases (first word = the name SGE uses, rest = aliases) makes SGE treat
  # the reverse name of our address (and "localhost") as this host. /etc/hosts stays as is.
  # Must exist before the daemons start (they read it at start-up).
  ip=$(getent ahostsv4 "$host" | awk 'NR==1{print $1}')
  rev=""; [ -n "$ip" ] && rev=$("$UTIL/gethostbyaddr" -name "$ip" 2>/dev/null || true)
  aliases=$(printf '%s\n' "$rev" localhost | awk -v h="$host" 'NF && $1!=h && !seen[$1]++' | tr '\n' ' ')
  echo "$host ${aliases% }" > "$COMMON/host_aliases"; chmod 644 "$COMMON/host_aliases"
  # Ports: the daemons and clients look up sge_qmaster/sge_execd in /etc/services
  # (Debian's netbase has them as aliases of sge-qmaster 6444, sge-execd 6445); add if missing.
  getent services sge_qmaster >/dev/null || echo "sge_qmaster	6444/tcp	# Grid Engine Qmaster" >> /etc/services
  getent services sge_execd   >/dev/null || echo "sge_execd	6445/tcp	# Grid Engine Execd"   >> /etc/services
}

# ---------------------------------------------------------------- daemons
pid_alive() {  # $1 pidfile, $2 expected comm
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  [ -d "/proc/$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}
qmaster_pidfile() { echo "$SPOOL/qmaster/qmaster.pid"; }
# The execd spools under $SPOOL/execd/<name>/, where <name> is the daemon's own idea of
# its host name. Here that is "localhost" (the reverse name of 127.0.0.1), not "vm", so
# do not build the path from the host name: take whichever execd.pid names a live execd.
execd_pidfile() {
  local f
  for f in "$SPOOL"/execd/*/execd.pid; do
    pid_alive "$f" sge_execd && { echo "$f"; return 0; }
  done
  echo "$SPOOL/execd/none/execd.pid"
}
qmaster_up() { pid_alive "$(qmaster_pidfile)" sge_qmaster; }
execd_up()   { pid_alive "$(execd_pidfile)" sge_execd; }

wait_for() {  # $1 seconds, rest: command
  local t=$1; shift
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || return 1
    sleep 0.5
  done
}

# Start the daemons with a clean environment, as an init system would: a job's
# environment is the execd's environment plus SGE's variables (plus -v/-V), so an execd
# started from an interactive/CI shell would leak that shell's variables (PATH, venvs,
# proxies...) into every job and hide missing "-V"/"-v" in the code under test.
daemon_env() {
  env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
    SGE_ROOT="$SGE_ROOT" SGE_CELL="$SGE_CELL" "$@"
}

start_qmaster() {
  if qmaster_up; then log "sge_qmaster already running (pid $(cat "$(qmaster_pidfile)"))"; return; fi
  log "starting sge_qmaster"
  # Started as root it daemonises and drops to admin_user (sgeadmin, from bootstrap);
  # pid file: $SPOOL/qmaster/qmaster.pid, log: $SPOOL/qmaster/messages. cd / so that it
  # does not hold the caller's cwd.
  (cd / && daemon_env /usr/sbin/sge_qmaster)
  wait_for 30 qconf -sh || die "qmaster did not answer within 30 s; see $SPOOL/qmaster/messages"
}

start_execd() {
  if execd_up; then log "sge_execd already running (pid $(cat "$(execd_pidfile)"))"; return; fi
  log "starting sge_execd"
  # Runs as root (real uid) so that the shepherd can run jobs as their owners.
  # Spool + log: $SPOOL/execd/<host>/{messages,execd.pid,active_jobs}.
  (cd / && daemon_env /usr/sbin/sge_execd)
  wait_for 30 execd_up || die "execd did not start; see $SPOOL/execd/*/messages"
}

# Ask politely through qconf (-kej: execd and its jobs; -km: qmaster), then SIGTERM the
# pid from the daemon's own pid file, then SIGKILL. qconf can be refused (e.g. a qmaster
# started before host_aliases existed refuses every client), hence the fallbacks.
# sge_qmaster needs ~10 s to shut down after SIGTERM.
stop_pid() {  # $1 pid, $2 qconf args
  local pid=$1; shift
  qconf "$@" >/dev/null 2>&1 || true
  wait_for 15 bash -c "! [ -d /proc/$pid ]" && return 0
  kill "$pid" 2>/dev/null || true
  wait_for 20 bash -c "! [ -d /proc/$pid ]" && return 0
  kill -9 "$pid" 2>/dev/null || true
}

stop_daemons() {
  local host pid; host=$(sge_host)
  if execd_up; then
    pid=$(cat "$(execd_pidfile)")
    log "stopping sge_execd (pid $pid) and its jobs"
    stop_pid "$pid" -kej "$host"
  fi
  if qmaster_up; then
    pid=$(cat "$(qmaster_pidfile)")
    log "stopping sge_qmaster (pid $pid)"
    stop_pid "$pid" -km
  fi
  log "stopped"
}

# ---------------------------------------------------------------- configuration (needs qmaster)
# qconf -sconf prints long values with "\" continuation lines; join them back into one
# line per key, then rewrite selected keys and load the whole file with -Mconf (the file
# name must be the configuration name, "global").
configure_global() {
  local d; d=$(mktemp -d)
  qconf -sconf global \
    | awk '{ if (sub(/\\$/, "")) { buf = buf $0 } else { print buf $0; buf = "" } }' \
    | sed -E 's/[[:space:]]+/ /g' | grep -v '^#' \
    | sed -E \
      -e 's/^min_uid .*/min_uid 0/' \
      -e 's/^min_gid .*/min_gid 0/' \
      -e 's/^administrator_mail .*/administrator_mail none/' \
      -e 's/^max_u_jobs .*/max_u_jobs 0/' \
      -e 's/^reporting_params .*/reporting_params accounting=true reporting=false flush_time=00:00:01 joblog=false sharelog=00:00:00 accounting_flush_time=00:00:00/' \
      > "$d/global"
  # min_uid/min_gid 0: the default 1000 makes every job of root (uid 0) fail to start.
  # administrator_mail none: no mail attempts through the (unstarted) exim4.
  # accounting_flush_time=0: qacct sees a job the moment it ends (default: buffered 15 s).
  # max_u_jobs 0: no per-user job limit (the queue-limit test sets one for a while).
  qconf -Mconf "$d/global" >/dev/null
  rm -rf "$d"
}

configure_scheduler() {
  local d; d=$(mktemp -d)
  # schedule_interval 1 s (default 15 s); flush_submit_sec/flush_finish_sec 1: also run
  # the scheduler 1 s after any submit or job end -> a trivial job starts in ~1-2 s.
  # No load adjustments: the machine's load comes from other work, not from our jobs.
  qconf -ssconf | sed -E \
    -e 's/^schedule_interval .*/schedule_interval 0:0:1/' \
    -e 's/^flush_submit_sec .*/flush_submit_sec 1/' \
    -e 's/^flush_finish_sec .*/flush_finish_sec 1/' \
    -e 's/^job_load_adjustments .*/job_load_adjustments NONE/' \
    -e 's/^load_adjustment_decay_time .*/load_adjustment_decay_time 0:0:0/' \
    > "$d/sched"
  qconf -Msconf "$d/sched" >/dev/null
  rm -rf "$d"
}

configure_cluster() {
  local host d; host=$(sge_host); d=$(mktemp -d)
  qconf -sh | grep -x "$host" >/dev/null || qconf -ah "$host" >/dev/null   # admin host (init_cluster adds it)
  qconf -ss 2>/dev/null | grep -x "$host" >/dev/null || qconf -as "$host" >/dev/null   # submit host
  if ! qconf -se "$host" >/dev/null 2>&1; then                   # execution host
    cat > "$d/exec" <<EOF
hostname              $host
load_scaling          NONE
complex_values        NONE
user_lists            NONE
xuser_lists           NONE
projects              NONE
xprojects             NONE
usage_scaling         NONE
report_variables      NONE
EOF
    qconf -Ae "$d/exec" >/dev/null
  fi
  if ! qconf -shgrp @allhosts >/dev/null 2>&1; then
    printf 'group_name @allhosts\nhostlist %s\n' "$host" > "$d/hgrp"
    qconf -Ahgrp "$d/hgrp" >/dev/null
  fi
  # A shared-memory parallel environment, so that "qsub -pe smp N" works as on real sites.
  if ! qconf -sp smp >/dev/null 2>&1; then
    cat > "$d/smp" <<'EOF'
pe_name            smp
slots              999
user_lists         NONE
xuser_lists        NONE
start_proc_args    NONE
stop_proc_args     NONE
allocation_rule    $pe_slots
control_slaves     FALSE
job_is_first_task  TRUE
urgency_slots      min
accounting_summary FALSE
qsort_args         NONE
EOF
    qconf -Ap "$d/smp" >/dev/null
  fi
  # all.q: the qconf -aq template with these changes:
  #   hostlist @allhosts, slots $SLOTS, pe_list smp,
  #   load_thresholds NONE   (default np_load_avg=1.75 puts the queue in alarm state "a" and
  #                           stops scheduling whenever the shared machine is busy),
  #   shell_start_mode unix_behavior (honour the script's #! line; the default
  #                           posix_compliant runs every script with /bin/sh unless -S is given),
  #   shell /bin/bash.
  cat > "$d/q" <<EOF
qname                 all.q
hostlist              @allhosts
seq_no                0
load_thresholds       NONE
suspend_thresholds    NONE
nsuspend              1
suspend_interval      00:05:00
priority              0
min_cpu_interval      00:05:00
processors            UNDEFINED
qtype                 BATCH INTERACTIVE
ckpt_list             NONE
pe_list               smp
rerun                 FALSE
slots                 $SLOTS
tmpdir                /tmp
shell                 /bin/bash
prolog                NONE
epilog                NONE
shell_start_mode      unix_behavior
starter_method        NONE
suspend_method        NONE
resume_method         NONE
terminate_method      NONE
notify                00:00:60
owner_list            NONE
user_lists            NONE
xuser_lists           NONE
subordinate_list      NONE
complex_values        NONE
projects              NONE
xprojects             NONE
calendar              NONE
initial_state         default
s_rt                  INFINITY
h_rt                  INFINITY
s_cpu                 INFINITY
h_cpu                 INFINITY
s_fsize               INFINITY
h_fsize               INFINITY
s_data                INFINITY
h_data                INFINITY
s_stack               INFINITY
h_stack               INFINITY
s_core                INFINITY
h_core                INFINITY
s_rss                 INFINITY
h_rss                 INFINITY
s_vmem                INFINITY
h_vmem                INFINITY
EOF
  if qconf -sq all.q >/dev/null 2>&1; then qconf -Mq "$d/q" >/dev/null; else qconf -Aq "$d/q" >/dev/null; fi
  rm -rf "$d"
}

# h_vmem: requestable, so that "-l h_vmem=250M" (reflow's memory request) becomes the job's hard
# memory limit: the shepherd sets it as each process's RLIMIT_AS (an allocation over it fails:
# Python raises MemoryError), and the execd kills the job (SIGKILL, qacct "failed 37", maxvmem
# over the limit) when its processes together pass it. Not consumable: a consumable needs a
# capacity per host (complex_values), and reflow's default request (4G) would then let only a
# few jobs of a fan-out run at once on this one small host. Debian's default complex already
# has it requestable; make sure of it (a site, or an earlier run, may have changed it).
configure_h_vmem() {
  local d line
  line=$(qconf -sc | awk '$1 == "h_vmem" {print $3, $4, $5, $6}')
  [ "$line" = "MEMORY <= YES NO" ] && return 0
  log "making h_vmem a requestable, enforced limit (was: ${line:-missing})"
  d=$(mktemp -d)
  qconf -sc | awk '$1 == "h_vmem" {$0 = "h_vmem h_vmem MEMORY <= YES NO 0 0"} {print}' > "$d/complex"
  grep -q '^h_vmem ' "$d/complex" || echo "h_vmem h_vmem MEMORY <= YES NO 0 0" >> "$d/complex"
  qconf -Mc "$d/complex" >/dev/null
  rm -rf "$d"
}

# Queues and settings that tests make for a while (tests/test_failures_sge.py: reflow_test_*.q with
# small h_rt/h_vmem, max_u_jobs): a test killed half-way leaves them behind. Remove and reset them,
# so that no later job lands in a queue with a 40 s limit.
clean_test_state() {
  local q
  for q in $(qconf -sql 2>/dev/null | grep '^reflow_test_' || true); do
    log "removing queue $q left by an earlier test"
    qconf -dq "$q" >/dev/null 2>&1 || log "could not remove $q (jobs still in it?)"
  done
  if [ "$(qconf -sconf | awk '$1 == "max_u_jobs" {print $2}')" != 0 ]; then
    log "resetting max_u_jobs left by an earlier test"
    configure_global
  fi
}

# ---------------------------------------------------------------- readiness
queue_ready() {  # all.q@host listed and not in an unknown/alarm/disabled/error state
  local host st; host=$(sge_host)
  st=$(qstat -f -q "all.q@$host" 2>/dev/null | awk -v q="all.q@$host" '$1==q {print ($6==""?"ok":$6)}')
  [ "$st" = ok ]
}

smoke_test() {
  local out t0 t1 rc
  out=$(mktemp /tmp/sge-smoke.XXXXXX)
  t0=$(date +%s.%N)
  # -sync y: qsub blocks until the job ends and returns its exit status.
  rc=0
  timeout "$SMOKE_TIMEOUT" qsub -sync y -b y -j y -o "$out" -N sge_smoke /bin/echo sge-ok >/dev/null 2>&1 || rc=$?
  t1=$(date +%s.%N)
  if [ "$rc" = 0 ] && grep -qx sge-ok "$out"; then
    log "test job ran: submit-to-end $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}') s"
    rm -f "$out"
  else
    die "test job failed (qsub rc=$rc, output: $(cat "$out" 2>/dev/null)); see qstat -j, $SPOOL/*/messages"
  fi
}

# ---------------------------------------------------------------- commands
# A fingerprint of everything "start" configures: when it matches the stamp written by the
# last successful start and both daemons answer, start has nothing to do.
STAMP=/var/lib/reflow-test-sge/stamp
config_fingerprint() {
  { cat "$0"; echo "$SLOTS"; cat "$COMMON/host_aliases" "$COMMON/act_qmaster" 2>/dev/null; } | md5sum | cut -d' ' -f1
}

# Jobs left by an earlier (killed) test run would hold slots: delete them all. This is a
# test cluster; only reflow's tests and benches submit to it, under the cluster lock.
clean_jobs() {
  local ids
  ids=$(qstat -u '*' 2>/dev/null | awk 'NR>2 {print $1}' | sort -u | tr '\n' ' ')
  if [ -n "${ids// /}" ]; then
    log "deleting jobs left from earlier runs: $ids"
    # shellcheck disable=SC2086
    qdel -f $ids >/dev/null 2>&1 || true
    wait_for 60 bash -c "[ -z \"\$(qstat -u '*' 2>/dev/null)\" ]" || log "some jobs are still listed after qdel -f"
  fi
}

rotate_accounting() {
  local acct="$COMMON/accounting"
  if [ -f "$acct" ] && [ "$(stat -c %s "$acct")" -gt $((20 * 1024 * 1024)) ]; then
    log "rotating $acct ($(stat -c %s "$acct") bytes)"
    mv "$acct" "$acct.old" && : > "$acct" && chown "$ADMIN:$ADMIN" "$acct"
  fi
}

cmd_start() {
  pkgs_installed || die "packages not installed: run '$0 install'"
  init_cluster_if_needed
  local before after
  before=$(cat "$COMMON/host_aliases" "$COMMON/act_qmaster" 2>/dev/null || true)
  write_host_files
  after=$(cat "$COMMON/host_aliases" "$COMMON/act_qmaster")
  # The daemons read host_aliases/act_qmaster only at start-up: restart them if these changed.
  if [ "$before" != "$after" ] && { qmaster_up || execd_up; }; then
    log "host_aliases/act_qmaster changed: restarting the daemons"
    stop_daemons
  fi
  if qmaster_up && execd_up && [ "$(cat "$STAMP" 2>/dev/null)" = "$(config_fingerprint)" ] \
     && qconf -sh >/dev/null 2>&1 && queue_ready; then
    clean_jobs
    clean_test_state
    rotate_accounting
    log "already running and configured (host=$(sge_host), slots=$SLOTS)"
    return 0
  fi
  rm -f "$STAMP"
  start_qmaster
  configure_global
  configure_scheduler
  configure_cluster
  configure_h_vmem
  start_execd
  # execd's first load report marks the queue usable (state "u" until then).
  wait_for 60 queue_ready || { qstat -f >&2 || true; die "all.q not ready after 60 s"; }
  clean_jobs
  clean_test_state
  rotate_accounting
  smoke_test
  mkdir -p "$(dirname "$STAMP")"
  config_fingerprint > "$STAMP"
  log "SGE is up: SGE_ROOT=$SGE_ROOT SGE_CELL=$SGE_CELL host=$(sge_host) slots=$SLOTS"
}

cmd_status() {
  local ok=0
  if qmaster_up; then echo "sge_qmaster: running (pid $(cat "$(qmaster_pidfile)"))"; else echo "sge_qmaster: not running"; ok=1; fi
  if execd_up; then echo "sge_execd:   running (pid $(cat "$(execd_pidfile)"))"; else echo "sge_execd:   not running"; ok=1; fi
  if [ $ok = 0 ]; then qstat -f || ok=1; fi
  return $ok
}

case "${1:-}" in
  install) install_pkgs; cmd_start ;;
  start)   cmd_start ;;
  stop)    if pkgs_installed; then stop_daemons; rm -f "$STAMP"; else log "not installed"; fi ;;
  clean)   pkgs_installed || die "not installed"; qmaster_up || die "sge_qmaster is not running"; clean_jobs ;;
  status)  pkgs_installed || { echo "not installed"; exit 1; }; cmd_status || exit 1 ;;
  *) echo "usage: $0 {install|start|stop|status|clean}" >&2; exit 2 ;;
esac

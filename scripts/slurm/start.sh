#!/usr/bin/env bash
# Start a real one-node SLURM cluster on this machine: munged + slurmctld + slurmd, as root,
# with no systemd, no cgroups and no accounting database. Everything it writes (config, munge
# key, state, spool, PID files, logs, the job-completion log) lives under one state folder.
#
#   eval "$(scripts/slurm/start.sh [STATE_DIR])"     # prints the `export ...` lines to use
#   sbatch --wrap 'hostname'; squeue; sinfo
#   learnforget train -m hydra/launcher=local_slurm ...
#   scripts/slurm/stop.sh "$LEARNFORGET_SLURM_STATE"  # stops exactly what this started
#
# STATE_DIR defaults to a new folder under /tmp; it must be traversable by the `munge` user
# (the script makes it mode 755). Installs Debian's slurm-wlm and munge with apt when they
# are missing (needs root). Preemption is set up the way a shared cluster does it: jobs in
# the default partition `debug` are preempted (requeued) by jobs in partition `urgent`; they
# first get their --signal (submitit: USR2) and GraceTime seconds before they are killed.
#
# Environment knobs: SLURM_GRACE_TIME (30), SLURM_CPUS (nproc), SLURM_MEM_MB (half of the
# memory, at most 8192), SLURM_CTLD_PORT / SLURM_SLURMD_PORT (first free from 6817 / 6818).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log() { echo "slurm/start: $*" >&2; }
die() { log "error: $*"; exit 1; }
started=0
# On any failure after a daemon was started, stop what this run started.
cleanup() { rc=$?; if [ $rc != 0 ] && [ $started = 1 ]; then bash "$here/stop.sh" "$S" >&2 || true; fi; exit $rc; }
trap cleanup EXIT

[ "$(id -u)" = 0 ] || die "needs root (slurmd runs jobs as root; apt installs the packages)"

# ---------------------------------------------------------------- install (once per machine)
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
  command -v apt-get >/dev/null || die "slurm-wlm/munge are missing and there is no apt-get"
  t0=$(date +%s)
  # Keep the packages' init scripts from starting system-wide daemons with default paths.
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; then
    log "no apt package lists yet: apt-get update"
    apt-get update -q >/dev/null || die "apt-get update failed"
  fi
  if ! apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null 2>"${TMPDIR:-/tmp}/slurm-apt.err"; then
    log "apt-get install failed; running apt-get update once and retrying"
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null \
      || { [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d; die "apt-get install slurm-wlm munge failed"; }
  fi
  [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
  log "installed slurm-wlm $(slurmctld -V | awk '{print $2}') and munge in $(( $(date +%s) - t0 ))s"
fi
id munge >/dev/null 2>&1 || die "user munge does not exist (is the munge package installed?)"

# ---------------------------------------------------------------- state folder
S="${1:-}"
if [ -z "$S" ]; then
  S="$(mktemp -d /tmp/learnforget-slurm.XXXXXX)"
fi
mkdir -p "$S"
S="$(cd "$S" && pwd)"
for f in munge/munged.pid run/slurmctld.pid run/slurmd.pid; do
  if [ -s "$S/$f" ] && kill -0 "$(cat "$S/$f")" 2>/dev/null; then
    die "$S/$f: a daemon from an earlier start is still running; run scripts/slurm/stop.sh $S first"
  fi
done
chmod 755 "$S"
mkdir -p "$S/etc" "$S/ctld" "$S/spool" "$S/run" "$S/log" "$S/munge"
runuser -u munge -- test -x "$S" \
  || die "$S is not reachable by the munge user (a parent folder is private); use a folder under /tmp"

# ---------------------------------------------------------------- ports
port_in_use() {  # listening TCP sockets from /proc (no ss/netstat needed)
  local hex; hex=$(printf '%04X' "$1")
  cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk -v p=":$hex" '$4 == "0A" && substr($2, length($2) - 4) == p {f=1} END {exit !f}'
}
free_port() {
  local p=$1
  while port_in_use "$p" || port_in_use "$((p + 1))"; do p=$((p + 2)); done
  echo "$p"
}
ctld_port="${SLURM_CTLD_PORT:-$(free_port 6817)}"
slurmd_port="${SLURM_SLURMD_PORT:-$((ctld_port + 1))}"

# ---------------------------------------------------------------- munge
munge_sock="$S/munge/munge.socket.2"
chown munge:munge "$S/munge"
chmod 711 "$S/munge"   # munged requires the socket folder to be searchable by everyone
if [ ! -s "$S/munge/munge.key" ]; then
  head -c 1024 /dev/urandom > "$S/munge/munge.key"
fi
chown munge:munge "$S/munge/munge.key"
chmod 400 "$S/munge/munge.key"
started=1
runuser -u munge -- munged --socket="$munge_sock" --key-file="$S/munge/munge.key" \
  --pid-file="$S/munge/munged.pid" --log-file="$S/munge/munged.log" \
  --seed-file="$S/munge/munged.seed" \
  || die "munged did not start (see $S/munge/munged.log)"
for _ in $(seq 50); do [ -S "$munge_sock" ] && break; sleep 0.1; done
[ -S "$munge_sock" ] || die "munged socket $munge_sock did not appear"

# ---------------------------------------------------------------- slurm.conf
host="$(hostname -s)"
cpus="${SLURM_CPUS:-$(nproc)}"
mem_total_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
mem_mb="${SLURM_MEM_MB:-$(( mem_total_mb / 2 < 8192 ? mem_total_mb / 2 : 8192 ))}"
grace="${SLURM_GRACE_TIME:-30}"
conf="$S/etc/slurm.conf"
cat > "$conf" <<EOF
# Written by scripts/slurm/start.sh: a one-node cluster on $host, state in $S
ClusterName=learnforget
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may start again after ~15 s instead of ~170 s
AuthInfo=socket=$munge_sock,cred_expire=10
StateSaveLocation=$S/ctld
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no systemd, no cgroups
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# no slurmdbd: finished jobs go to a text log, read by scripts/slurm/bin/sacct
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$S/log/jobcomp.log
MinJobAge=3600
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=10
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
# per-core and per-memory scheduling (else every job takes the whole node)
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
# preemption as on a shared cluster: a job in 'urgent' requeues jobs in 'debug'; the victims get
# their --signal (submitit: USR2) at once and are killed GraceTime seconds later
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$grace
PartitionName=urgent Nodes=ALL Default=NO MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
echo "$host" > "$S/etc/hostname"
export SLURM_CONF="$conf"

# ---------------------------------------------------------------- daemons
slurmctld -c -f "$conf" || die "slurmctld did not start (see $S/log/slurmctld.log)"
slurmd -f "$conf" || die "slurmd did not start (see $S/log/slurmd.log)"
t0=$(date +%s)
state=""
while :; do
  state="$(sinfo -h -N -o '%t' 2>/dev/null | head -1 || true)"
  [ "$state" = idle ] && break
  if [ $(( $(date +%s) - t0 )) -ge 60 ]; then
    tail -n 5 "$S/log/slurmctld.log" "$S/log/slurmd.log" >&2 || true
    die "node not idle after 60 s (state: ${state:-none}); logs in $S/log"
  fi
  sleep 0.5
done
log "cluster up in $S (node $host: $cpus CPUs, ${mem_mb} MB; ports $ctld_port/$slurmd_port; idle after $(( $(date +%s) - t0 ))s)"

env_file="$S/env.sh"
cat > "$env_file" <<EOF
export SLURM_CONF='$conf'
export LEARNFORGET_SLURM_STATE='$S'
export PATH='$here/bin':"\$PATH"
EOF
cat "$env_file"

#!/usr/bin/env bash
# Stop the cluster that scripts/slurm/start.sh started in STATE_DIR, and only that: its jobs are
# cancelled, then slurmd, slurmctld and munged are stopped by the PID files in STATE_DIR.
#
#   scripts/slurm/stop.sh STATE_DIR [--rm]     # --rm: also delete STATE_DIR
set -uo pipefail

log() { echo "slurm/stop: $*" >&2; }
S="${1:-}"
[ -n "$S" ] && [ -d "$S" ] || { log "usage: stop.sh STATE_DIR [--rm]"; exit 2; }
S="$(cd "$S" && pwd)"
conf="$S/etc/slurm.conf"
[ -f "$conf" ] || { log "$S has no etc/slurm.conf: not a folder from start.sh"; exit 2; }
export SLURM_CONF="$conf"

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
pid_of() { [ -s "$1" ] && cat "$1" 2>/dev/null || true; }

stop_pid() {  # stop_pid NAME PID: TERM, wait up to 10 s, then KILL
  local name=$1 pid=$2
  alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 100); do alive "$pid" || { log "stopped $name ($pid)"; return 0; }; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null
  log "killed $name ($pid)"
}

# 1. this cluster's jobs (the controller still runs): cancel and give them a moment to end
ctld_pid="$(pid_of "$S/run/slurmctld.pid")"
if alive "$ctld_pid"; then
  jobs="$(squeue -h -o '%A' 2>/dev/null | sort -u | tr '\n' ' ')"
  if [ -n "${jobs// }" ]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 40); do
      [ -z "$(squeue -h -o '%A' 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
fi

# 2. the daemons, by their PID files
stop_pid slurmd "$(pid_of "$S/run/slurmd.pid")"
stop_pid slurmctld "$ctld_pid"

# 3. anything a job of this cluster left behind (only when the daemons died before their jobs):
#    slurmstepd processes of this cluster work in a folder under STATE_DIR; job processes carry
#    SLURM_CONF pointing into it together with a SLURM_JOB_ID (a shell that merely exported
#    SLURM_CONF has no SLURM_JOB_ID)
for p in /proc/[0-9]*; do
  pid=${p#/proc/}
  [ "$pid" = $$ ] && continue
  exe="$(readlink "$p/exe" 2>/dev/null || true)"
  cwd="$(readlink "$p/cwd" 2>/dev/null || true)"
  ours=0
  case "$exe" in
    */slurmstepd*) case "$cwd" in "$S"|"$S"/*) ours=1 ;; esac ;;
  esac
  if [ $ours = 0 ]; then
    env_lines="$( { tr '\0' '\n' < "$p/environ"; } 2>/dev/null)" || continue
    grep -qxF "SLURM_CONF=$conf" <<<"$env_lines" && grep -q '^SLURM_JOB_ID=' <<<"$env_lines" && ours=1
  fi
  if [ $ours = 1 ]; then
    log "killing leftover process $pid ($( { tr '\0' ' ' < "$p/cmdline"; } 2>/dev/null | cut -c1-80))"
    kill -KILL "$pid" 2>/dev/null || true
  fi
done

# 4. munged last (the daemons talk to it while shutting down)
stop_pid munged "$(pid_of "$S/munge/munged.pid")"

if [ "${2:-}" = "--rm" ]; then
  rm -rf "$S" && log "removed $S"
fi
exit 0

#!/usr/bin/env bash
# A real single-node SLURM on this machine, for the SLURM tests and for trying sweeps before a cluster:
#   launch/slurm_local.sh start    install (first time, Debian packages, root) + start; ~20 s, idempotent
#   launch/slurm_local.sh stop     cancel all jobs, stop the daemons, wipe job state + accounting (ids restart at 1)
#   launch/slurm_local.sh status   sinfo + squeue
# Partitions: debug (default, requeued when preempted) and urgent (preempts debug). Matching Hydra profile:
# cluster=local_slurm. Knobs (LOCAL_SLURM_DIR, LOCAL_SLURM_CPUS, ...) are documented in local_slurm/start.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

# The daemons outlive this script: they must not inherit its open files (e.g. a lock held by a caller's flock).
close_inherited_fds() {
  local fd
  for fd in $(ls /proc/$$/fd); do
    [ "$fd" -gt 2 ] && eval "exec $fd>&-" 2>/dev/null || true
  done
}

case "${1:-}" in
  start) close_inherited_fds; exec bash "$here/local_slurm/start.sh" ;;
  stop) exec bash "$here/local_slurm/stop.sh" --purge ;;
  status) sinfo && squeue ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac

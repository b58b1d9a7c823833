#!/usr/bin/env bash
# slurm-cluster.sh: a real, private SLURM cluster on this one machine, for CI and local runs of cluster/slurm/*.
#
#   slurm-cluster.sh up [--nodes N] [--cpus C]   install (if missing) and start munged + slurmctld + N slurmd
#   slurm-cluster.sh install                     only install slurm-wlm + munge (if missing; apt-get, root): needs
#                                                the package mirror, so run it before entering a private namespace
#   slurm-cluster.sh down                        cancel its jobs, stop everything it started (by PID), keep logs
#   slurm-cluster.sh status                      its daemons (pid, alive/dead) and sinfo
#   slurm-cluster.sh env                         print `export SLURM_CONF=...`; use: eval "$(slurm-cluster.sh env)"
#   slurm-cluster.sh exec CMD [ARG...]           run CMD where the cluster's network is (sbatch, squeue, scancel, ...)
#
# Debian's slurm-wlm (22.05, built with --enable-multiple-slurmd): nodes node1..N are slurmd processes on this host
# (NodeHostname=localhost, one Port each), so an allocation of N nodes is a real one: SLURM_NODEID 0..N-1, one
# srun task per node, dependencies, exit codes, jobcomp records. Everything is private to the state dir: its own
# munged (own key and socket, AuthInfo=socket=...), its own ports, config, spool, pid files and logs; nothing in
# /etc or /run is touched, so it coexists with a system SLURM/munge or another copy of this harness (other dir,
# other ports). Needs root (slurmd runs jobs as their submitting user). Never pkill/killall: daemons are stopped
# by the PIDs in their pid files, and job processes by their SLURM_CONF (= this cluster's) in /proc/PID/environ.
#
# Network: the daemons, and so every job (Ray head and workers, torchrun, the ranks), run in a private network
# namespace holding only `lo` (`unshare --net`, held open by a `sleep` whose pid is in run/netns.pid). Ray binds its
# servers to every interface unless the node address is exactly 127.0.0.1, which a multi-node Ray cannot use, and
# the nodes here share one host: in this namespace "every interface" is loopback, and nothing outside the machine (or
# outside the namespace) can reach a job. Clients must run in it too: `slurm-cluster.sh exec sbatch ...`, or
# `nsenter --net=/proc/$(cat $FPO_SLURM_DIR/run/netns.pid)/ns/net sbatch ...`. Where a network namespace cannot be
# made (no CAP_SYS_ADMIN), FPO_SLURM_NETNS=auto falls back to the host's network with a warning: the jobs' Ray
# processes then listen on all of the host's interfaces, with Ray's token authentication (cluster/slurm/cache.sbatch).
#
# Environment (defaults):
#   FPO_SLURM_DIR=/tmp/fpo-slurm-$UID    config, state, spool, logs (log/), pid files (run/), munge (munge/)
#   FPO_SLURM_NODES=2                    node count (or `up --nodes N`)
#   FPO_SLURM_CPUS=<nproc>               CPUs= per node (or `up --cpus C`); each node claims them, so N nodes
#                                        oversubscribe the real cores (SlurmdParameters=config_overrides)
#   FPO_SLURM_MEM=4000                   RealMemory= (MB) per node
#   FPO_SLURM_CTLD_PORT=16817            slurmctld port
#   FPO_SLURM_SLURMD_PORT=16820          node i's slurmd listens on FPO_SLURM_SLURMD_PORT + i
#   FPO_SLURM_INSTALL=1                  0: never apt-get; fail if slurm-wlm/munge are missing
#   FPO_SLURM_NETNS=auto                 1: a private network namespace or fail; auto: fall back to the host's
#                                        network (with a warning); 0: the host's network
set -euo pipefail

DIR=${FPO_SLURM_DIR:-/tmp/fpo-slurm-$(id -u)}
NNODES=${FPO_SLURM_NODES:-2}
CPUS=${FPO_SLURM_CPUS:-$(nproc)}
MEM=${FPO_SLURM_MEM:-4000}
CTLD_PORT=${FPO_SLURM_CTLD_PORT:-16817}
SLURMD_PORT=${FPO_SLURM_SLURMD_PORT:-16820}
INSTALL=${FPO_SLURM_INSTALL:-1}
NETNS=${FPO_SLURM_NETNS:-auto}
CONF=$DIR/etc/slurm.conf
MUNGE_SOCK=$DIR/munge/munge.socket
export SLURM_CONF=$CONF

log() { printf '[slurm-cluster %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }   # alive PIDFILE
node_names() { sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' "$CONF" 2>/dev/null; }   # from the written config

# in_net CMD...: run CMD in the cluster's network namespace (as is, on the host's network)
in_net() {
  if [ -s "$DIR/run/netns.pid" ]; then nsenter --net="/proc/$(cat "$DIR/run/netns.pid")/ns/net" -- "$@"; else "$@"; fi
}

start_netns() {   # a network namespace with only lo, held by a sleep (pid in run/netns.pid)
  local holder
  case $NETNS in 0) return 0 ;; 1|auto) ;; *) die "FPO_SLURM_NETNS must be 0, 1 or auto, not $NETNS" ;; esac
  if command -v unshare >/dev/null && command -v nsenter >/dev/null && command -v ip >/dev/null; then
    # 127.0.0.2 on lo as well: getaddrinfo(AI_ADDRCONFIG), which SLURM uses to bind, finds no address to use where
    # 127.0.0.1 is the only one (glibc counts every IPv4 address except 127.0.0.1)
    setsid unshare --net -- sh -c 'ip link set lo up && ip addr add 127.0.0.2/8 dev lo && exec sleep infinity' \
      </dev/null >/dev/null 2>&1 &
    holder=$!
    for _ in $(seq 50); do
      if [ "$(readlink "/proc/$holder/ns/net" 2>/dev/null)" != "$(readlink /proc/self/ns/net)" ] \
         && [ "$(cat "/proc/$holder/comm" 2>/dev/null)" = sleep ]; then
        echo "$holder" > "$DIR/run/netns.pid"
        log "private network namespace (only lo), held by pid $holder"
        return 0
      fi
      kill -0 "$holder" 2>/dev/null || break
      sleep 0.1
    done
    kill "$holder" 2>/dev/null || true
  fi
  [ "$NETNS" = auto ] || die "cannot make a network namespace (unshare --net, nsenter and ip are needed, as root)"
  log "warning: no private network namespace here: the jobs run on the host's network, and their Ray processes" \
      "(multi-node: node addresses other than 127.0.0.1) listen on all of its interfaces (token authentication on)"
}

install_pkgs() {
  local need=() p
  for p in slurm-wlm munge; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
  [ ${#need[@]} -eq 0 ] && return 0
  [ "$INSTALL" = 1 ] || die "missing packages: ${need[*]} (FPO_SLURM_INSTALL=0)"
  command -v apt-get >/dev/null || die "missing packages ${need[*]} and no apt-get: install SLURM + munge yourself"
  log "apt-get install ${need[*]}"
  # a package mirror that does not resolve or answer for a moment (seen: "Temporary failure resolving
  # 'deb.debian.org'" minutes after a machine started) is retried, 5 tries over ~2 min, before giving up
  local try wait=5
  for try in 1 2 3 4 5; do
    if apt-get -o Acquire::Retries=2 update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=2 install -y -qq --no-install-recommends \
        "${need[@]}" >/dev/null; then
      return 0
    fi
    [ "$try" = 5 ] && break
    log "apt-get failed (try $try of 5): again in ${wait}s"
    sleep "$wait"
    wait=$((wait * 2))
  done
  die "apt-get could not install ${need[*]} after 5 tries (its messages above): install them yourself or retry"
}

start_munge() {   # a munged of our own: own key, socket and pid file under $DIR/munge
  local d=$DIR/munge
  install -d -m 0755 "$d"
  while [ "$d" != / ]; do   # munged requires every directory above its socket to be searchable by all
    [ -n "$(find "$d" -maxdepth 0 -perm -o+x)" ] || die "$d is not searchable by all (chmod o+x): munged refuses it"
    d=$(dirname "$d")
  done
  [ -s "$DIR/munge/munge.key" ] || { mungekey -c -k "$DIR/munge/munge.key" && chmod 600 "$DIR/munge/munge.key"; }
  munged --socket="$MUNGE_SOCK" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/run/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"       # daemonizes
  for _ in $(seq 50); do munge -n --socket="$MUNGE_SOCK" >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "munged did not come up (see $DIR/log/munged.log)"
}

write_conf() {
  local i
  cat > "$CONF" <<EOF
# written by cluster/local/slurm-cluster.sh; private to $DIR
ClusterName=fpolocal
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldPort=$CTLD_PORT
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
EOF
  for i in $(seq "$NNODES"); do
    echo "NodeName=node$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((SLURMD_PORT + i)) CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"
  done >> "$CONF"
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO" >> "$CONF"
}

idle_nodes() { in_net timeout 10 sinfo -h -t idle -o '%D' 2>/dev/null | awk '{s += $1} END {print s + 0}'; }

all_up() {   # every daemon in the pid files is alive
  local n
  alive "$DIR/run/munged.pid" && alive "$DIR/run/slurmctld.pid" || return 1
  [ "$NETNS" = 0 ] || [ ! -e "$DIR/run/netns.pid" ] || alive "$DIR/run/netns.pid" || return 1
  for n in $(node_names); do alive "$DIR/run/slurmd-$n.pid" || return 1; done
}

cmd_up() {
  local t0=$SECONDS n
  while [ $# -gt 0 ]; do
    case $1 in
      --nodes) NNODES=$2; shift 2 ;;
      --nodes=*) NNODES=${1#*=}; shift ;;
      --cpus) CPUS=$2; shift 2 ;;
      --cpus=*) CPUS=${1#*=}; shift ;;
      *) die "up: unknown argument $1" ;;
    esac
  done
  [ "$(id -u)" = 0 ] || die "needs root (slurmd must be able to run jobs as their user)"
  if [ -f "$CONF" ] && all_up; then
    log "already up ($DIR); export SLURM_CONF=$CONF"; return 0
  fi
  compgen -G "$DIR/run/*.pid" >/dev/null && { log "partly up or stale in $DIR: cleaning up first"; cmd_down; }
  install_pkgs
  install -d -m 0755 "$DIR" "$DIR"/{etc,state,log,run}
  rm -rf "${DIR:?}/state"/* "${DIR:?}/spool"
  start_netns
  start_munge
  write_conf
  for n in $(node_names); do mkdir -p "$DIR/spool/$n"; done
  in_net slurmctld -i                    # -i: ignore old state; daemonizes, pid file in $DIR/run
  for n in $(node_names); do in_net slurmd -N "$n"; done
  for _ in $(seq 150); do
    [ "$(idle_nodes)" = "$NNODES" ] && break
    [ $((SECONDS - t0)) -lt 60 ] || break  # bounded, even if sinfo times out every time
    sleep 0.2
  done
  [ "$(idle_nodes)" = "$NNODES" ] || { in_net sinfo >&2 || true; die "nodes not idle after 60 s (logs: $DIR/log)"; }
  in_net sinfo
  log "up in $((SECONDS - t0)) s: $NNODES nodes x $CPUS CPUs; export SLURM_CONF=$CONF$([ -s "$DIR/run/netns.pid" ] \
    && echo "; clients: $0 exec CMD")"
}

kill_pids() {   # kill_pids PID...: SIGTERM, wait up to 15 s for all, then SIGKILL
  local p alive_any
  [ $# -gt 0 ] || return 0
  kill "$@" 2>/dev/null || true
  for _ in $(seq 150); do
    alive_any=0; for p in "$@"; do kill -0 "$p" 2>/dev/null && alive_any=1; done
    [ $alive_any = 0 ] && return 0; sleep 0.1
  done
  for p in "$@"; do kill -0 "$p" 2>/dev/null && { log "pid $p still alive, SIGKILL"; kill -9 "$p" 2>/dev/null || true; }; done
}

kill_pidfiles() {
  local f pids=()
  for f in "$@"; do alive "$f" && pids+=("$(cat "$f")"); done
  kill_pids "${pids[@]}"
  rm -f "$@"
}

job_pids() {   # processes of this cluster's jobs and steps: SLURM_CONF=$CONF and a SLURM_JOB_ID (or slurmstepd)
  local f p
  for f in $(grep -lzxF "SLURM_CONF=$CONF" /proc/[0-9]*/environ 2>/dev/null); do
    p=${f#/proc/}; p=${p%/environ}
    [ "$p" = $$ ] && continue
    if grep -qz '^SLURM_JOB_ID=' "$f" 2>/dev/null || [ "$(cat "/proc/$p/comm" 2>/dev/null)" = slurmstepd ]; then
      echo "$p"
    fi
  done
}

cmd_down() {
  local pids
  if alive "$DIR/run/slurmctld.pid"; then
    in_net scancel --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 75); do [ -z "$(in_net squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  kill_pidfiles "$DIR"/run/slurmd-*.pid
  # slurmstepd and job processes that outlived slurmd (or escaped its process tree): this cluster's only
  pids=$(job_pids | tr '\n' ' ')
  [ -n "$pids" ] && { log "leftover job processes: $pids"; kill_pids $pids; }
  kill_pidfiles "$DIR/run/slurmctld.pid"
  kill_pidfiles "$DIR/run/munged.pid"
  kill_pidfiles "$DIR/run/netns.pid"     # the namespace goes with its last process
  rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
  log "down ($DIR; logs kept in $DIR/log)"
}

cmd_status() {
  local f
  for f in "$DIR"/run/*.pid; do
    [ -s "$f" ] && printf '%-48s %-8s %s\n' "$f" "$(cat "$f")" "$(alive "$f" && echo alive || echo dead)"
  done
  if alive "$DIR/run/slurmctld.pid"; then in_net sinfo; in_net squeue; else echo "slurmctld not running ($DIR)"; return 1; fi
}

case ${1:-} in
  up) shift; cmd_up "$@" ;;
  install) [ "$(id -u)" = 0 ] || die "install: needs root (apt-get)"; install_pkgs ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  exec) shift; [ $# -gt 0 ] || die "exec: no command"; in_net "$@" ;;
  *) sed -n '2,40p' "$0"; exit 2 ;;
esac

# common.sh: sourced by cache.sbatch, train.sbatch and pipeline.sh; never run on its own.
# Owns the job layout (nodes, head, ports, CPUs/GPUs per node), the Python environment, and dry-run printing,
# so that the three entry scripts never recompute any of it. Needs $PROJECT set by the caller.
# Every variable is documented in cluster/README.md.

fpo_log() { printf '[fpo %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
fpo_die() { fpo_log "error: $*"; exit 2; }

# fpo_parse_args "$@": take --dry-run (or DRY_RUN=1 / FPO_DRY_RUN=1) and -h/--help; everything else, minus one
# leading "--", is passed to the job program (FPO_ARGS).
fpo_parse_args() {
  DRY_RUN=${FPO_DRY_RUN:-${DRY_RUN:-0}}
  FPO_ARGS=()
  while [ $# -gt 0 ]; do
    case $1 in
      --dry-run) DRY_RUN=1 ;;
      -h|--help) sed -n '2,/^set -/p' "$FPO_SCRIPT" | sed '$d'; exit 0 ;;
      --) shift; FPO_ARGS+=("$@"); break ;;
      *) FPO_ARGS+=("$1") ;;
    esac
    shift
  done
  [ "$DRY_RUN" = 1 ] || DRY_RUN=0
}

# fpo_python_env: PY (the interpreter, as seen inside FPO_EXEC_PREFIX) and EXEC (the prefix, an array).
# Exports PYTHONPATH=$PROJECT:... so that Ray workers, the cache driver and the training ranks import fpo_dist
# from this checkout whether or not it is pip-installed.
fpo_python_env() {
  read -r -a EXEC <<< "${FPO_EXEC_PREFIX:-}"
  if [ -n "${FPO_PYTHON:-}" ]; then PY=$FPO_PYTHON
  elif [ -n "${FPO_VENV:-}" ]; then PY=$FPO_VENV/bin/python; export PATH=$FPO_VENV/bin:$PATH
  elif [ ${#EXEC[@]} -eq 0 ] && [ -x "$PROJECT/.venv/bin/python" ]; then PY=$PROJECT/.venv/bin/python
  else PY=python3
  fi
  export PYTHONPATH=$PROJECT${PYTHONPATH:+:$PYTHONPATH}
}

# fpo_layout: NODES (array), NNODES, HEAD, JOB_ID, CPUS_PER_NODE, GPUS_PER_NODE, PORT_BASE, IP_CMD.
# Inside an allocation everything comes from SLURM_*; with --dry-run outside one, a layout is faked from
# FPO_DRY_NODES ("a b c") or FPO_NNODES (node1..N, default 2) so the commands can be inspected anywhere.
fpo_layout() {
  local g
  JOB_ID=${SLURM_JOB_ID:-0}
  if [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null; then
    mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  elif [ "$DRY_RUN" = 1 ]; then
    if [ -n "${FPO_DRY_NODES:-}" ]; then read -r -a NODES <<< "$FPO_DRY_NODES"
    else mapfile -t NODES < <(seq -f 'node%g' 1 "${SLURM_NNODES:-${FPO_NNODES:-2}}"); fi
  else
    fpo_die "not inside a SLURM allocation: submit with sbatch, or use --dry-run to see the commands"
  fi
  NNODES=${#NODES[@]}
  HEAD=${NODES[0]}
  CPUS_PER_NODE=${FPO_CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-$(nproc)}}
  g=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
  GPUS_PER_NODE=${FPO_GPUS_PER_NODE:-${g##*:}}          # SLURM_GPUS_PER_NODE may read "a100:4"
  [[ $GPUS_PER_NODE =~ ^[0-9]+$ ]] || fpo_die "cannot read GPUs per node from '$GPUS_PER_NODE': set FPO_GPUS_PER_NODE"
  # per-job ports: 10 consecutive ports from 20000 + 10 * (job id mod 1000), below the ephemeral range
  PORT_BASE=${FPO_PORT_BASE:-$((20000 + (JOB_ID % 1000) * 10))}
  # how a node finds its own address (run on that node): first address of `hostname -I`, or FPO_IP_CMD
  local default_ip_cmd="hostname -I | cut -d' ' -f1"
  IP_CMD=${FPO_IP_CMD:-$default_ip_cmd}
}

# fpo_head_ip: HEAD_IP, the address other nodes reach the head node on (FPO_HEAD_IP, else asked of the head node).
fpo_head_ip() {
  if [ -n "${FPO_HEAD_IP:-}" ]; then HEAD_IP=$FPO_HEAD_IP
  elif [ "$DRY_RUN" = 1 ]; then HEAD_IP="<ip of $HEAD>"
  else
    HEAD_IP=$(srun --overlap -N1 -n1 -w "$HEAD" bash -c "$IP_CMD") || fpo_die "could not get the address of $HEAD"
    [ -n "$HEAD_IP" ] || fpo_die "empty address for $HEAD from: $IP_CMD (set FPO_IP_CMD or FPO_HEAD_IP)"
  fi
}

# fpo_node_step_args: NODE_STEP (array), the srun options shared by every node-wide step: one task per node that
# may use all of the job's CPUs and GPUs on it, overlapping the other steps of this job.
fpo_node_step_args() {
  NODE_STEP=(--overlap --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_NODE")
  [ "$GPUS_PER_NODE" -gt 0 ] && NODE_STEP+=(--gres="gpu:$GPUS_PER_NODE")
  local extra; read -r -a extra <<< "${FPO_SRUN_ARGS:-}"
  NODE_STEP+=("${extra[@]}")
}

fpo_print_layout() {   # fpo_print_layout TITLE [KEY VALUE]...
  printf '== %s ==\n' "$1"; shift
  printf '%-14s %s\n' job_id "$JOB_ID" nodes "$NNODES (${NODES[*]})" head "$HEAD" head_ip "$HEAD_IP" \
    cpus_per_node "$CPUS_PER_NODE" gpus_per_node "$GPUS_PER_NODE" port_base "$PORT_BASE" project "$PROJECT" \
    python "$PY" exec_prefix "${EXEC[*]:-(none)}" "$@"
}

fpo_show() {   # fpo_show LABEL CMD...: print the exact command, shell-quoted (in real runs too: it goes to the log)
  local label=$1; shift
  printf '%-14s' "$label"; printf ' %q' "$@"; printf '\n'
}

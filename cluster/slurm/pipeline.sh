#!/usr/bin/env bash
# pipeline.sh: submit the cache job, then the training job to start only if the cache job succeeded.
#
#   FPO_CACHE_CONFIG=configs/cache.yaml FPO_TRAIN_CONFIG=configs/train.yaml cluster/slurm/pipeline.sh [--dry-run]
#
# sbatch --parsable cache.sbatch, then sbatch --dependency=afterok:<cache id> --kill-on-invalid-dep=yes
# train.sbatch (a failed cache job cancels the training job instead of leaving it pending forever).
# Prints FPO_CACHE_JOB=<id> and FPO_TRAIN_JOB=<id> on stdout (eval-able) and where the logs go.
# The jobs get this environment (sbatch --export=ALL), so every variable of cache.sbatch and train.sbatch
# applies; --dry-run prints the sbatch commands and both scripts' dry runs, and submits nothing.
#
# Variables (see cluster/README.md): FPO_CACHE_NODES (2), FPO_TRAIN_NODES (2), FPO_PARTITION, FPO_GPUS_PER_NODE,
# FPO_TIME_CACHE, FPO_TIME_TRAIN (sbatch --time), FPO_SBATCH_ARGS (both jobs), FPO_CACHE_SBATCH_ARGS,
# FPO_TRAIN_SBATCH_ARGS, FPO_LOG_DIR ($PROJECT/logs/slurm), FPO_PROJECT, FPO_DRY_RUN / DRY_RUN.
set -euo pipefail

FPO_SCRIPT=${BASH_SOURCE[0]}
PROJECT=${FPO_PROJECT:-$(cd "$(dirname "$FPO_SCRIPT")/../.." && pwd)}
# shellcheck source=cluster/slurm/common.sh
source "$PROJECT/cluster/slurm/common.sh"
fpo_parse_args "$@"
[ ${#FPO_ARGS[@]} -eq 0 ] || fpo_die "pipeline.sh takes only --dry-run; pass job arguments in FPO_CACHE_ARGS / FPO_TRAIN_ARGS"

LOG_DIR=${FPO_LOG_DIR:-$PROJECT/logs/slurm}
common=(--parsable --export="ALL,FPO_PROJECT=$PROJECT")
[ -n "${FPO_PARTITION:-}" ] && common+=(--partition="$FPO_PARTITION")
[ -n "${FPO_GPUS_PER_NODE:-}" ] && [ "$FPO_GPUS_PER_NODE" != 0 ] && common+=(--gpus-per-node="$FPO_GPUS_PER_NODE")
read -r -a extra <<< "${FPO_SBATCH_ARGS:-}"; common+=("${extra[@]}")

CACHE=(sbatch "${common[@]}" --nodes="${FPO_CACHE_NODES:-2}" --output="$LOG_DIR/%x-%j.out")
[ -n "${FPO_TIME_CACHE:-}" ] && CACHE+=(--time="$FPO_TIME_CACHE")
read -r -a extra <<< "${FPO_CACHE_SBATCH_ARGS:-}"; CACHE+=("${extra[@]}" "$PROJECT/cluster/slurm/cache.sbatch")

train_cmd() {   # train_cmd CACHE_JOB_ID
  TRAIN=(sbatch "${common[@]}" --nodes="${FPO_TRAIN_NODES:-2}" --output="$LOG_DIR/%x-%j.out"
         --dependency="afterok:$1" --kill-on-invalid-dep=yes)
  [ -n "${FPO_TIME_TRAIN:-}" ] && TRAIN+=(--time="$FPO_TIME_TRAIN")
  read -r -a extra <<< "${FPO_TRAIN_SBATCH_ARGS:-}"; TRAIN+=("${extra[@]}" "$PROJECT/cluster/slurm/train.sbatch")
}

if [ "$DRY_RUN" = 1 ]; then
  train_cmd '<cache job id>'
  echo "== fpo pipeline (dry run) =="
  fpo_show cache_submit "${CACHE[@]}"
  fpo_show train_submit "${TRAIN[@]}"
  echo "logs           $LOG_DIR/fpo-cache-<id>.out, $LOG_DIR/fpo-train-<id>.out"
  echo
  FPO_NNODES=${FPO_CACHE_NODES:-2} bash "$PROJECT/cluster/slurm/cache.sbatch" --dry-run
  echo
  FPO_NNODES=${FPO_TRAIN_NODES:-2} bash "$PROJECT/cluster/slurm/train.sbatch" --dry-run
  exit 0
fi

mkdir -p "$LOG_DIR"
cache_id=$("${CACHE[@]}"); cache_id=${cache_id%%;*}          # --parsable prints "id" or "id;cluster"
train_cmd "$cache_id"
train_id=$("${TRAIN[@]}") || { fpo_log "training submit failed: cancelling cache job $cache_id"; scancel "$cache_id"; exit 1; }
train_id=${train_id%%;*}
fpo_log "cache job $cache_id -> $LOG_DIR/fpo-cache-$cache_id.out"
fpo_log "train job $train_id (after cache job $cache_id succeeds) -> $LOG_DIR/fpo-train-$train_id.out"
echo "FPO_CACHE_JOB=$cache_id"
echo "FPO_TRAIN_JOB=$train_id"

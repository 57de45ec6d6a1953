#!/usr/bin/env bash
# The four stages one after another, meta and finetune under torchrun with NPROC processes sharing the machine's
# GPU(s) (each falls back to one process if torchrun fails), then the per-stage wall times:
#
#     NPROC=4 bash benchmarks/gpu_stages.sh configs/gpu.yaml [--set key=value ...]
#
# Each line "=== <stage> start at N s" marks the script's own clock; benchmarks/stage_times.py --standalone
# prints what MLflow recorded for the latest run of each stage.
set -u
cd "$(dirname "$0")/.."
CFG=${1:?usage: NPROC=4 bash benchmarks/gpu_stages.sh CONFIG [--set key=value ...]}
shift
NPROC=${NPROC:-4}
EXP=$(python3 -c "import sys; from pipeline.config import load_config; print(load_config(sys.argv[1]).experiment)" \
  "$CFG" 2>&1) || { echo "error: cannot read config $CFG: ${EXP##*$'\n'}" >&2; exit 2; }
t0=$(date +%s)
mark() { echo "=== $1 at $(( $(date +%s) - t0 )) s"; }
plain() { python3 -m pipeline run --stage "$1" --config "$CFG" "${@:2}"; }
ddp() {
  if [ "$NPROC" -gt 1 ]; then
    python3 -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m pipeline run --stage "$1" \
      --config "$CFG" "${@:2}" && return 0
    echo "!!! torchrun $1 failed; running it in one process"
  fi
  plain "$@"
}
mark "backbone start"; plain backbone "$@" || exit 1
mark "meta start"; ddp meta "$@" || exit 1
mark "finetune start"; ddp finetune "$@" || exit 1
mark "evaluate start"; plain evaluate "$@" || exit 1
mark "all done"
python3 benchmarks/stage_times.py --experiment "$EXP" --standalone

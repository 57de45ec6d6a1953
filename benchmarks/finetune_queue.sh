#!/usr/bin/env bash
# How busy torchrun keeps its processes in the finetune stage: the backbone stage, then one fine-tune sweep under
# `torchrun --nproc_per_node NPROC` (one thread each), in a fresh MLflow store under a temporary folder, then what
# MLflow recorded: the stage's wall time and the sum of its jobs' own training seconds. The processes were busy
# sum / (NPROC x wall) of the time (logging and the sweep's tail are the rest).
#
#     PIPELINE_DATA_ROOT=../shared/data bash benchmarks/finetune_queue.sh [CODE_DIR] [--set key=value ...]
#
# CODE_DIR: run the pipeline of another checkout (e.g. a `git worktree` of an earlier commit) with this one's
# stage_times.py, to compare two versions on the same sweep. The sweep: configs/smoke.yaml with scratch and transfer,
# k = 5 and 20, 6 seeds, up to 10 epochs with patience 3 (early stopping makes jobs of one k differ in length).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
code=$here
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then code=$(cd "$1" && pwd); shift; fi
NPROC=${NPROC:-2}
: "${PIPELINE_DATA_ROOT:?set PIPELINE_DATA_ROOT to the data folder (../shared/data)}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export MLFLOW_TRACKING_URI="sqlite:///$work/mlflow.db"
args=(--config "$here/configs/smoke.yaml" --set "data.root=$PIPELINE_DATA_ROOT" --set "finetune.arms=[scratch,transfer]"
      --set "finetune.shots=[5,20]" --set finetune.seeds=6 --set finetune.epochs=10 --set finetune.patience=3 "$@")
cd "$work"
ln -s "$code/pipeline" "$code/stages" .  # `-m pipeline` runs the code of $code
echo "code: $code ($(git -C "$code" rev-parse --short HEAD)), $NPROC processes"
python3 -m pipeline run --stage backbone "${args[@]}" > backbone.log 2>&1 || { tail -20 backbone.log; exit 1; }
t0=$(date +%s.%N)
OMP_NUM_THREADS=1 python3 -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m pipeline run \
  --stage finetune "${args[@]}" > finetune.log 2>&1 || { tail -40 finetune.log; exit 1; }
echo "torchrun finetune: $(python3 -c "import time; print(f'{time.time() - $t0:.1f}')") s wall, start to exit"
grep -E "rank [0-9]+/[0-9]+ (trained|on)" finetune.log || true
python3 "$here/benchmarks/stage_times.py" --experiment fewshot-medmeta-smoke --standalone | grep -E "^finetune"
python3 - "$NPROC" <<'PY'
import sys
from mlflow.tracking import MlflowClient
c = MlflowClient()
exp = c.get_experiment_by_name("fewshot-medmeta-smoke").experiment_id
stage = c.search_runs([exp], "tags.`pipeline.stage` = 'finetune'")[0]
jobs = c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{stage.info.run_id}'", max_results=10000)
busy = sum(j.data.metrics["seconds"] for j in jobs) / (int(sys.argv[1]) * stage.data.metrics["finetune_seconds"])
print(f"busy: the jobs' own seconds are {busy:.3f} of {sys.argv[1]} processes x finetune_seconds")
PY

#!/usr/bin/env bash
# k=100 on fresh seeds, chosen by validation log-loss (docs/experiments/11-k100-fresh-seeds-log-loss.md):
# a Lite0 and a Lite2 backbone run, then for each seed the noisy-student self-trained transfer arm of each body
# (configs/selftrain.yaml, finetune.pseudo_augment=strong, the default), one finetune run per (body, seed) so that
# every finished seed is complete; then the validation comparison (log-loss and AUC, test split not read) and the
# evaluate stage (test). Logs to docs/experiments/logs/replicate_k100_{runs,val}.log.
#   PIPELINE_DATA_ROOT=../shared/data bash benchmarks/replicate_k100.sh        # seeds 5-8
#   FIRST=5 LAST=5 bash benchmarks/replicate_k100.sh                            # one seed
# Resume in the same MLflow store (same backbone runs, finished seeds reused, the rest run):
#   B0=<lite0 backbone run> B2=<lite2 backbone run> PRIOR0="<lite0 finetune runs>" PRIOR2="<lite2 ...>" FIRST=7 bash ...
set -euo pipefail
cd "$(dirname "$0")/.."
CFG=configs/selftrain.yaml
FIRST=${FIRST:-5}
LAST=${LAST:-8}  # pre-registered 5-9, amended to 5-8 before any result (docs/experiments/11-k100-fresh-seeds-log-loss.md)
LOG=docs/experiments/logs/replicate_k100_runs.log
LITE2=(--set backbone.model=tf_efficientnet_lite2)
K100=(--set 'finetune.arms=[transfer]' --set 'finetune.shots=[100]' --set finetune.seeds=1)
run_id() { sed -n "s/^$1: run //p" | tail -1; }   # the CLI's last line: "<stage>: run <id>"
# reused seeds are only comparable with new ones fine-tuned from the same backbone runs
if [ -n "${PRIOR0:-}${PRIOR2:-}" ] && { [ -z "${B0:-}" ] || [ -z "${B2:-}" ]; }; then
  echo "PRIOR0/PRIOR2 need B0 and B2: the backbone runs those finetune runs started from" >&2; exit 2
fi
echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) seeds $FIRST-$LAST" >> "$LOG"
B0=${B0:-$(python -m pipeline run --stage backbone --config $CFG | tee /dev/stderr | run_id backbone)}
B2=${B2:-$(python -m pipeline run --stage backbone --config $CFG "${LITE2[@]}" | tee /dev/stderr | run_id backbone)}
echo "backbone lite0 $B0 lite2 $B2" | tee -a "$LOG"
read -r -a F0 <<< "${PRIOR0:-}"; read -r -a F2 <<< "${PRIOR2:-}"   # finished seeds before FIRST, in seed order
[ ${#F0[@]} -eq ${#F2[@]} ] || { echo "PRIOR0 and PRIOR2 need one run per seed each" >&2; exit 2; }
[ ${#F0[@]} -eq 0 ] || echo "reusing finished seeds: lite0 ${F0[*]} lite2 ${F2[*]}" | tee -a "$LOG"
for s in $(seq "$FIRST" "$LAST"); do
  F0+=("$(python -m pipeline run --stage finetune --config $CFG "${K100[@]}" --set finetune.first_seed="$s" \
          --set finetune.backbone_run="$B0" | tee /dev/stderr | run_id finetune)")
  echo "$(date -u +%FT%TZ) seed $s lite0 finetune ${F0[-1]}" | tee -a "$LOG"
  F2+=("$(python -m pipeline run --stage finetune --config $CFG "${LITE2[@]}" "${K100[@]}" \
          --set finetune.first_seed="$s" --set finetune.backbone_run="$B2" | tee /dev/stderr | run_id finetune)")
  echo "$(date -u +%FT%TZ) seed $s lite2 finetune ${F2[-1]}" | tee -a "$LOG"
done
# validation first (the rule reads it alone), then the test split once per model
RUNS=("${F0[@]}"); for r in "${F2[@]}"; do RUNS+=("lite2=$r"); done   # Lite2's arm is lite2.transfer in both
VAL=(); for r in "${RUNS[@]}"; do VAL+=(--run "$r"); done
python benchmarks/ensemble_val.py --config $CFG "${VAL[@]}" --members transfer,lite2.transfer \
  --compare lite2.transfer,transfer --metric log_loss --metric auc | tee docs/experiments/logs/replicate_k100_val.log
MERGE=$(IFS=,; echo "${RUNS[*]:1}")   # every run but the first, which is evaluate's upstream run
python -m pipeline run --stage evaluate --config $CFG "${K100[@]}" --set evaluate.ensemble=false \
  --set evaluate.from_run="${F0[0]}" --set "evaluate.merge_runs=[$MERGE]" \
  --set 'evaluate.ensembles=[ensemble-2ns=transfer+lite2.transfer]' | tee -a "$LOG"

#!/usr/bin/env bash
# Regenerates every table of docs/drm.md §1–§6 (and the fixed-vs-cross-validated population head table) from
# embedding folders made as docs/drm.md "Setup used here" says. Reports land in $RUNS (default runs/drm); each
# step is skipped when its report exists, so a run stopped half-way resumes. Usage:
#   G=... T=... H=... bash bench/drm_tables.sh          # H (HH-RLHF) optional; synthetic via train_drm.py
set -euo pipefail
RUNS=${RUNS:-runs/drm}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} MKL_NUM_THREADS=${MKL_NUM_THREADS:-2}
step() {  # step REPORT COMMAND...: run unless REPORT exists, timing it
  local report=$1; shift
  [ -e "$report" ] && return 0
  local start=$SECONDS
  "$@" >/dev/null
  echo "$(date -u +%H:%M:%S) $report $((SECONDS - start)) s, load $(cut -d' ' -f1-3 /proc/loadavg)"
}
both=("gpt4 $G $T" "turbo $T $G")
for item in "${both[@]}"; do
  read -r j own other <<<"$item"
  step "$RUNS/$j-pop/headset.json" rewardprism decompose --embeddings "$own" --out "$RUNS/$j-pop"
  step "$RUNS/$j-pop/report.md" rewardprism evaluate --embeddings "$own" --heads "$RUNS/$j-pop" --adapt-from "$other" \
    --methods hyre,default,bt --out "$RUNS/$j-pop/report.md"
done
# cross-judge: one judge's head set on the other judge's test half (its own split record keeps training prompts out)
step "$RUNS/gpt4-pop/on-turbo.md" rewardprism evaluate --embeddings "$T" --heads "$RUNS/gpt4-pop" \
  --methods hyre,default,bt --out "$RUNS/gpt4-pop/on-turbo.md"
step "$RUNS/turbo-pop/on-gpt4.md" rewardprism evaluate --embeddings "$G" --heads "$RUNS/turbo-pop" \
  --methods hyre,default,bt --out "$RUNS/turbo-pop/on-gpt4.md"
if [ -n "${H:-}" ]; then
  for kind in pop pcs; do
    flag=$([ $kind = pcs ] && echo --no-population-head || true)
    step "$RUNS/hh-$kind/headset.json" rewardprism decompose --embeddings "$H" $flag --out "$RUNS/hh-$kind"
    step "$RUNS/hh-$kind/report.md" rewardprism evaluate --embeddings "$H" --heads "$RUNS/hh-$kind" \
      --out "$RUNS/hh-$kind/report.md"
  done
fi
for item in "${both[@]}"; do
  read -r j own other <<<"$item"
  step "$RUNS/$j-pcs/headset.json" rewardprism decompose --embeddings "$own" --no-population-head --out "$RUNS/$j-pcs"
  step "$RUNS/$j-pcs/report.md" rewardprism evaluate --embeddings "$own" --heads "$RUNS/$j-pcs" --adapt-from "$other" \
    --out "$RUNS/$j-pcs/report.md"
  step "$RUNS/$j-pcs/report-zero-prior.md" rewardprism evaluate --embeddings "$own" --heads "$RUNS/$j-pcs" \
    --adapt-from "$other" --no-prior --out "$RUNS/$j-pcs/report-zero-prior.md"
done
# synthetic users (§6); SYNTHETIC= skips it. Locally: Ray tasks give bit-identical decompositions (§"method")
if [ -n "${SYNTHETIC-1}" ]; then
  step runs/drm-synthetic/report.md python train_drm.py --config configs/drm_synthetic.yaml --override use_ray=false
fi

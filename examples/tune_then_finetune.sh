#!/usr/bin/env bash
# Search the learning rate and batch size with KerasTuner, then fine-tune with the best configuration found.
#
#   bash examples/tune_then_finetune.sh                   # ResNet50 on Oxford Flowers 102 (a GPU: a few hours)
#   OUT=runs/search2 bash examples/tune_then_finetune.sh  # another output folder
#   TLKIT_SMOKE=1 bash examples/tune_then_finetune.sh     # a tiny run on a CPU in a minute or two
#
# Re-running the same command resumes the search where it stopped (finished trials are not redone).
# `tlkit tune ... --then-finetune` does steps 1 and 2 in one command; they are separate here to show the file
# that joins them: best_config.yaml, a complete finetune configuration.
set -euo pipefail
cd "$(dirname "$0")/.."
TLKIT=${TLKIT:-tlkit}          # the command to run (tests point it at a recorder)
OUT=${OUT:-runs/flowers-search}

if [[ "${TLKIT_SMOKE:-0}" == 1 ]]; then
  OUT=${SMOKE_OUT:-$(mktemp -d)}
  TINY=${TINY:-$OUT/tiny.keras}  # a tiny random-weight .keras backbone (an existing one is reused)
  [[ -f "$TINY" ]] || python -c "from tlkit.testing import make_tiny_backbone as m; m('$TINY')"
  DATA=(--dataset shapes --shapes-per-class 8 --image-size 32 --base "$TINY" --weights none)
  SEARCH=(--tuner random --max-trials 2 --trial-epochs 1 --head-steps 1 --lr-range 1e-4 1e-2 --batch-sizes 8 16)
  FINAL=(--head-steps 1 --epochs 1)
else
  DATA=(--config examples/finetune_flowers.yaml)
  SEARCH=(--tuner bayesian --max-trials 20 --trial-epochs 4 --lr-range 1e-5 1e-2 --batch-sizes 16 32 64)
  FINAL=(--epochs 12)
fi

# 1. The search: every finetune flag works here too; trials.csv, best_config.yaml and a plot land in $OUT/search.
"$TLKIT" tune "${DATA[@]}" "${SEARCH[@]}" --objective val_accuracy --output-dir "$OUT/search"

# 2. Fine-tune for real with the best configuration (flags given here override it).
"$TLKIT" finetune --config "$OUT/search/best_config.yaml" "${FINAL[@]}" --output-dir "$OUT/final"

# 3. The test split: top-1, top-5, mean per-class accuracy, confusion matrix.
"$TLKIT" evaluate "$OUT/final" --split test

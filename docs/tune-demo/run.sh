#!/usr/bin/env bash
# The CPU demonstration of `isoconv tune` (docs/tune-demo/README.md): tune cpu-quick's lr and wd, then compare
# the retrained best with the shipped recipe on the test set, 3 seeds each. Outputs go to $OUT (default
# /tmp/tune-demo); the small text files are copied into docs/tune-demo/ by hand.
set -euo pipefail
DATA=${DATA:-/work/shared/data}
OUT=${OUT:-/tmp/tune-demo}
mkdir -p "$OUT"
date -u +"start %FT%TZ"
# --no-retrain: the comparison below trains the best configuration itself (seed 0 is the retraining), 3 seeds
python3 -m isoconv tune src/isoconv/tuning/cpu-quick-lr-wd.yaml --parallel 2 --no-retrain --data-dir "$DATA" \
  --out "$OUT/study"
date -u +"tuned %FT%TZ"
cat > "$OUT/compare.yaml" <<YAML
description: "shipped cpu-quick vs the tuned best.yaml, the same first 6,000 training images, full test set"
settings: {train_subset: 6000, eval_every: 5}
variants:
  - {name: shipped-cpu-quick, recipe: cpu-quick}
  - {name: tuned-best, recipe: $OUT/study/best.yaml}
YAML
python3 -m isoconv ablate "$OUT/compare.yaml" --seeds 3 --parallel 2 --data-dir "$DATA" --out "$OUT/compare"
date -u +"compared %FT%TZ"

#!/usr/bin/env bash
# The CPU demo trained with post-hoc EMA (two tracked lengths, a snapshot every 3.22 kimg: 20 over
# the run's 64.4 kimg), then FID and SWD of 500 samples for each of several EMA lengths, against
# the 168 training images. Writes docs/phema_demo/: the eval table (JSON), the plot of FID against
# the EMA length, the fit record of each length and a grid of each length's first 64 samples.
#   bash benchmarks/phema_demo.sh [WORKDIR]        (default runs/demo_phema; a rerun resumes)
set -euo pipefail
cd "$(dirname "$0")/.."
w=${1:-runs/demo_phema}
lengths=${LENGTHS:-0.04,0.07,0.1,0.14,0.2}
python -m patchdiff.main --config=configs/demo.py --workdir="$w" \
  --config.train.phema.stds='(0.05,0.1)' --config.train.phema.every_kimg=3.22
python -m patchdiff.main --mode=eval --workdir="$w" --ema_std="$lengths" --seeds=0-499
mkdir -p docs/phema_demo
cp "$w"/phema_ema/eval_*.json "$w"/phema_ema/eval_*.png docs/phema_demo/
for d in "$w"/phema_ema/std_*/; do
  name=$(basename "$d")
  cp "$d"/reconstruction_*.json "docs/phema_demo/${name}_fit.json"
  grid=$(find "$d" -name grid.png | head -1)
  [[ -n "$grid" ]] && cp "$grid" "docs/phema_demo/${name}_grid.png"
done
ls docs/phema_demo

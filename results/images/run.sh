#!/usr/bin/env bash
# The digits comparison of results/images/README.md: train Flux Matching and DSM at the same
# budget, sample both with EDM Heun, and score them (digit extractor) against half of the real
# digits beside the other half. Outputs under runs/images/ (ignored by git); the small files are
# copied here. Run from the repository root with the project venv active.
set -euo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
RUNS=runs/images
HERE=results/images
for m in flux dsm; do
  extra=""; [ "$m" = flux ] && extra="--chains 32"
  fluxbench images train --data digits --method "$m" $extra --steps 1500 --batch-size 128 --checkpoint-every 250 \
    --lr 1e-3 --ema-decay 0.999 --seed 0 --out "$RUNS/digits-$m" --no-progress --log-every 20
done
# the real digits split in two halves by index parity (899 and 898 images)
python -c "
import torch
from fluxbench.images import digits
x = digits()
torch.save(x[0::2].clone(), '$RUNS/digits-half-a.pt')
torch.save(x[1::2].clone(), '$RUNS/digits-half-b.pt')
"
fluxbench images fid --real "$RUNS/digits-half-a.pt" --fake "$RUNS/digits-half-b.pt" --out "$RUNS/fid-real-halves"
for m in flux dsm; do
  fluxbench images sample --checkpoint "$RUNS/digits-$m/checkpoint.pt" --sampler heun --steps 18 --n 898 --seed 1 \
    --out "$RUNS/digits-$m/heun" --no-progress
  fluxbench images fid --real "$RUNS/digits-half-a.pt" --fake "$RUNS/digits-$m/heun/samples.pt" --out "$RUNS/digits-$m/fid"
done
mkdir -p "$HERE/fid"
cp "$RUNS/fid-real-halves/fid.json" "$HERE/fid/real-halves.json"
for m in flux dsm; do
  mkdir -p "$HERE/$m"
  cp "$RUNS/digits-$m/config.json" "$RUNS/digits-$m/log.csv" "$HERE/$m/"
  cp "$RUNS/digits-$m/heun/grid.png" "$RUNS/digits-$m/heun/samples.json" "$HERE/$m/"
  cp "$RUNS/digits-$m/fid/fid.json" "$HERE/fid/$m.json"
done

#!/usr/bin/env bash
# The end-to-end demo (`make demo`): everything it needs is built here, offline, on CPU.
# DEMO=heads (default): procedural cartoon heads, where composition has exact rules and the benchmark
# (python -m refiner.bench) measures artifact rates. DEMO=photos: crops of the photos scikit-image and
# scikit-learn ship, evaluated by PSNR/SSIM/SWD against the clean crops.
# Each step is skipped when its result already exists; FORCE=1 rebuilds this demo from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
# The demo's runs log to wandb, and the diffusion runs also to CSV (the bench reads those); wandb is off unless
# you set WANDB_MODE:
# `WANDB_MODE=offline make demo` keeps local wandb runs (no login; `wandb sync` later), at ~15 s per run here.
export WANDB_MODE="${WANDB_MODE:-disabled}"
DEMO="${DEMO:-heads}"
case "$DEMO" in heads|photos) ;; *) echo "error: DEMO must be heads or photos, got '$DEMO'" >&2; exit 2;; esac
DATA="data/$DEMO" SHARDS="data/shards/$DEMO" OUT="outputs/$DEMO"
if [[ "${FORCE:-0}" == 1 ]]; then rm -rf "$DATA" "$SHARDS" "$OUT"; fi
P="paths.demo=$DEMO"
N=9
step() { printf '\n\033[1m==> [%s/%s] %s\033[0m\n' "$1" "$N" "$2"; }
start=$(date +%s)

if [[ "$DEMO" == heads ]]; then
  step 1 "demo images: procedural cartoon heads, train seed 0, val seed 1 (refiner.data.synthetic)"
  [[ -f "$DATA/train/heads.json" ]] || python -m refiner.data.synthetic "$DATA/train" --n 1500 --seed 0
  [[ -f "$DATA/val/heads.json" ]] || python -m refiner.data.synthetic "$DATA/val" --n 128 --seed 1
else
  step 1 "demo images: crops of the photos scikit-image and scikit-learn ship (chelsea, flower held out)"
  [[ -d "$DATA/train" ]] || python -m refiner.data.demo "$DATA"
fi

step 2 "train the tiny VQ-f4 autoencoder (the refiners' latent space)"
[[ -f "$OUT/vq_f4/checkpoints/last.ckpt" ]] || python train.py experiment=demo_vq_f4 "$P"

step 3 "train the tiny VQ-f8 autoencoder (its round trip makes the artifact-like degraded images)"
[[ -f "$OUT/vq_f8/checkpoints/last.ckpt" ]] || python train.py experiment=demo_vq_f8 "$P"

step 4 "build shards: clean + f8-degraded images and their precomputed f4 latents"
[[ -f "$SHARDS/val/manifest.json" ]] || python build_shards.py "$P"

step 5 "train the shape window, t in [250, 500) (blog: sampling steps 500-750)"
[[ -f "$OUT/refiner_500_750/checkpoints/last.ckpt" ]] || python train.py experiment=demo_refiner_500_750 "$P"

step 6 "finetune the detail window, t in [0, 250) (blog: steps 751-1000), from the shape window"
[[ -f "$OUT/refiner_751_1000/checkpoints/last.ckpt" ]] || python train.py experiment=demo_refiner_751_1000 "$P"

if [[ "$DEMO" == photos ]]; then
  step 9 "refine the held-out photos' f8-degraded crops from t=299 through both windows and evaluate"
  # t_start=299 (not the blog's 499): models this small, trained on 7 photos, repaint the input with training
  # content from higher noise levels; see the README's photo section for the numbers.
  python sample.py mode=evaluate "$P" inputs="$DATA/val" t_start=299 output_dir="$OUT/eval" hydra.run.dir="$OUT/eval"
  echo; echo "demo finished in $(( $(date +%s) - start )) s; comparison grid: $OUT/eval/comparison_grid.png"
  exit 0
fi

step 7 "train the equal-compute full-range model, t in [0, 1000) (the generator, and the SDEdit baseline)"
[[ -f "$OUT/full_range/checkpoints/last.ckpt" ]] || python train.py experiment=demo_full_range "$P"

step 8 "train the paired img2img baseline (f8-degraded -> clean, concat conditioning), equal compute"
[[ -f "$OUT/paired_baseline/checkpoints/last.ckpt" ]] || python train.py experiment=demo_paired_baseline "$P"

step 9 "benchmark at t_start 499: artifact rate, SWD and faithfulness per artifact source and method"
# methods=demo: one sweep point per method; `python -m refiner.bench` (methods=full) gives the README's sweep
python -m refiner.bench methods=demo "$P" output_dir="$OUT/bench" hydra.run.dir="$OUT/bench"

echo
echo "demo finished in $(( $(date +%s) - start )) s"
echo "  table:       $OUT/bench/results.md"
echo "  grid, plot:  $OUT/bench/comparison_grid.png  $OUT/bench/tradeoff.png"

#!/usr/bin/env bash
# The end-to-end demo (`make demo`): everything it needs is built here, offline, on CPU.
# Each step is skipped when its result already exists; FORCE=1 rebuilds from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE="${WANDB_MODE:-offline}"   # wandb logs locally, no login; `wandb sync` later if you like
if [[ "${FORCE:-0}" == 1 ]]; then rm -rf data/demo data/shards/demo outputs/demo; fi

step() { printf '\n\033[1m==> [%s/7] %s\033[0m\n' "$1" "$2"; }
start=$(date +%s)

step 1 "demo images: crops of the photos scikit-image and scikit-learn ship (chelsea, flower held out)"
[[ -d data/demo/train ]] || python -m refiner.data.demo data/demo

step 2 "train the tiny VQ-f4 autoencoder (the refiners' latent space)"
[[ -f outputs/demo/vq_f4/checkpoints/last.ckpt ]] || python train.py experiment=demo_vq_f4

step 3 "train the tiny VQ-f8 autoencoder (its round trip makes the artifact-like degraded images)"
[[ -f outputs/demo/vq_f8/checkpoints/last.ckpt ]] || python train.py experiment=demo_vq_f8

step 4 "build shards: clean + f8-degraded images and their precomputed f4 latents"
[[ -f data/shards/demo/val/manifest.json ]] || python build_shards.py

step 5 "train the shape window, t in [250, 500) (blog: sampling steps 500-750)"
[[ -f outputs/demo/refiner_500_750/checkpoints/last.ckpt ]] || python train.py experiment=demo_refiner_500_750

step 6 "finetune the detail window, t in [0, 250) (blog: steps 751-1000), from the shape window"
[[ -f outputs/demo/refiner_751_1000/checkpoints/last.ckpt ]] || python train.py experiment=demo_refiner_751_1000

step 7 "refine the held-out photos' f8-degraded crops from t=299 through both windows and evaluate"
# t_start=299 (not the blog's 499): models this small, trained on 7 photos, repaint the input with training
# content from higher noise levels; see the README's demo section for the numbers at each t_start.
python sample.py mode=evaluate inputs=data/demo/val t_start=299 output_dir=outputs/demo/eval hydra.run.dir=outputs/demo/eval

echo
echo "demo finished in $(( $(date +%s) - start )) s"
echo "  checkpoints: outputs/demo/refiner_500_750/checkpoints/last.ckpt"
echo "               outputs/demo/refiner_751_1000/checkpoints/last.ckpt"
echo "  metrics:     outputs/demo/eval/metrics.json"
echo "  comparison:  outputs/demo/eval/comparison_grid.png  (clean | degraded | after stage 1 | after stage 2)"

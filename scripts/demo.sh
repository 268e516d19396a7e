#!/usr/bin/env bash
# The end-to-end demo (`make demo`): everything it needs is built here, offline, on CPU.
# DEMO=heads (default): procedural cartoon heads, where composition has exact rules and the benchmark
# (python -m refiner.bench) measures artifact rates. DEMO=photos: crops of the photos scikit-image and
# scikit-learn ship, evaluated by PSNR/SSIM/SWD against the clean crops.
# FULL=1 (`make demo-full`, heads only): also trains the paired img2img baseline, runs the artifact-detection
# benchmark (refiner bench-artifacts) on both splits and the upscaling comparison
# (refiner bench-upscale), and runs the benchmark's whole
# sweep on both seed splits (tune, then report): the numbers of docs/experiments/. Plain `make demo` shows the chain against
# full-range SDEdit at equal compute and the unsharp mask, at t_start 499, in under 15 minutes.
# Each step is skipped when its result already exists; FORCE=1 rebuilds this demo from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
# The demo's runs log to wandb, and the diffusion runs also to CSV (the bench reads those); wandb is off unless
# you set WANDB_MODE:
# `WANDB_MODE=offline make demo` keeps local wandb runs (no login; `wandb sync` later), at ~15 s per run here.
export WANDB_MODE="${WANDB_MODE:-disabled}"
DEMO="${DEMO:-heads}" FULL="${FULL:-0}"
case "$DEMO" in heads|photos) ;; *) echo "error: DEMO must be heads or photos, got '$DEMO'" >&2; exit 2;; esac
case "$FULL" in 0|1) ;; *) echo "error: FULL must be 0 or 1, got '$FULL'" >&2; exit 2;; esac
if [[ "$FULL" == 1 && "$DEMO" != heads ]]; then echo "error: FULL=1 is for DEMO=heads (the benchmark)" >&2; exit 2; fi
DATA="data/$DEMO" SHARDS="data/shards/$DEMO" OUT="outputs/$DEMO"
if [[ "${FORCE:-0}" == 1 ]]; then rm -rf "$DATA" "$SHARDS" "$OUT"; fi
P="paths.demo=$DEMO"
N=$([[ "$FULL" == 1 ]] && echo 10 || echo 6)
step() { printf '\n\033[1m==> [%s/%s] %s\033[0m\n' "$1" "$N" "$2"; }
start=$(date +%s)

# Trainings that do not depend on each other run side by side, one CPU thread each: these models are so small
# that two single-thread runs do 1.37x the steps per second of one run on two threads (BENCHMARKS.md row 11). Each
# lane's output goes to $OUT/logs/<lane>.log; once every lane has ended, a failed one stops the demo and prints
# its log's tail.
LANES=()
lane() {  # lane NAME COMMAND...: run the command in the background on one thread
  local name=$1; shift
  mkdir -p "$OUT/logs"
  echo "    started: $name (log: $OUT/logs/$name.log)"
  ( export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1; "$@" ) > "$OUT/logs/$name.log" 2>&1 &
  LANES+=("$!:$name")
}
wait_lanes() {
  local failed=0 entry
  for entry in "${LANES[@]}"; do
    if wait "${entry%%:*}"; then echo "    finished: ${entry#*:}"
    else failed=1; echo "error: ${entry#*:} failed; the end of $OUT/logs/${entry#*:}.log:" >&2
         tail -n 20 "$OUT/logs/${entry#*:}.log" >&2; fi
  done
  LANES=()
  return $failed
}
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
train() {  # train RUN_DIR EXPERIMENT [overrides]: skipped when RUN_DIR has a last checkpoint
  local run=$1; shift
  [[ -f "$OUT/$run/checkpoints/last.ckpt" ]] || python train.py "$@" "$P"
}

if [[ "$DEMO" == heads ]]; then
  step 1 "demo images: procedural cartoon heads, train seed 0, val seed 1 (refiner.data.synthetic)"
  [[ -f "$DATA/train/heads.json" ]] || python -m refiner.data.synthetic "$DATA/train" --n 1500 --seed 0
  [[ -f "$DATA/val/heads.json" ]] || python -m refiner.data.synthetic "$DATA/val" --n 128 --seed 1
else
  step 1 "demo images: crops of the photos scikit-image and scikit-learn ship (chelsea, flower held out)"
  [[ -d "$DATA/train" ]] || python -m refiner.data.demo "$DATA"
fi

step 2 "train the tiny VQ-f4 autoencoder (the refiners' latent space)"
train vq_f4 experiment=demo_vq_f4

step 3 "train the tiny VQ-f8 autoencoder (its round trip makes the artifact-like degraded images)"
train vq_f8 experiment=demo_vq_f8

step 4 "build shards: clean + f8-degraded images and their precomputed f4 latents"
[[ -f "$SHARDS/val/manifest.json" ]] || python build_shards.py "$P"

if [[ "$DEMO" == photos ]]; then
  step 5 "train the shape window t in [250, 500), then the detail window t in [0, 250) from it"
  train refiner_500_750 experiment=demo_refiner_500_750
  train refiner_751_1000 experiment=demo_refiner_751_1000
  step 6 "refine the held-out photos' f8-degraded crops from t=299 through both windows and evaluate"
  # t_start=299 (not the blog's 499): models this small, trained on 7 photos, repaint the input with training
  # content from higher noise levels; see docs/experiments/photos.md for the numbers.
  python refine.py mode=evaluate "$P" inputs="$DATA/val" t_start=299 output_dir="$OUT/eval" hydra.run.dir="$OUT/eval"
  echo; echo "demo finished in $(( $(date +%s) - start )) s; comparison grid: $OUT/eval/comparison_grid.png"
  exit 0
fi

step 5 "train side by side: the shape window t in [250, 500) then the detail window t in [0, 250) from it (blog:
    steps 500-750, 751-1000), and the equal-compute full-range model t in [0, 1000) (the generator and the
    SDEdit baseline)$([[ "$FULL" == 1 ]] && echo ", and the paired img2img baseline (f8-degraded -> clean)")"
windows() { train refiner_500_750 experiment=demo_refiner_500_750 &&
            train refiner_751_1000 experiment=demo_refiner_751_1000; }
lane windows windows
lane full_range train full_range experiment=demo_full_range
if [[ "$FULL" == 1 ]]; then lane paired_baseline train paired_baseline experiment=demo_paired_baseline; fi
wait_lanes

if [[ "$FULL" == 1 ]]; then
  step 6 "benchmark, split=tune (the seeds recommended_t_start was chosen on): every method over its sweep"
  python -m refiner.bench split=tune "$P" output_dir="$OUT/bench_tune" hydra.run.dir="$OUT/bench_tune"
  step 7 "benchmark, split=report (the numbers of docs/experiments/): every method over its sweep"
  python -m refiner.bench split=report "$P" output_dir="$OUT/bench" hydra.run.dir="$OUT/bench"
  step 8 "artifact detection, adaptive strength, paste-back and colour fix, split=tune (fits t_start=auto: bench_tune/t_start_auto.json)"
  python -m refiner bench-artifacts split=tune "$P" output_dir="$OUT/bench_tune" hydra.run.dir="$OUT/bench_tune"
  step 9 "artifact detection, ASCED + TTC, adaptive strength, paste-back and colour fix, split=report"
  python -m refiner bench-artifacts split=report "$P" output_dir="$OUT/bench" hydra.run.dir="$OUT/bench"
  step 10 "upscaling x2: DemoFusion-style progressive vs bicubic then refine, split=report"
  python -m refiner bench-upscale split=report "$P" output_dir="$OUT/bench" hydra.run.dir="$OUT/bench"
else
  step 6 "benchmark at t_start 499: artifact rate, SWD and faithfulness per artifact source and method"
  # methods=demo: the chain, full-range SDEdit and the unsharp mask at one point each (make demo-full: everything)
  python -m refiner.bench methods=demo "$P" output_dir="$OUT/bench" hydra.run.dir="$OUT/bench"
fi

echo
echo "demo finished in $(( $(date +%s) - start )) s"
echo "  table:       $OUT/bench/results.md"
echo "  grid, plot:  $OUT/bench/comparison_grid.png  $OUT/bench/tradeoff.png"

# Every target sets up .venv on first use. On a machine without an NVIDIA GPU, torch is pinned
# to the CPU build 2.13.0; with `nvidia-smi` present, pip takes the default (CUDA) torch wheel.
# Override either way: make setup TORCH_SPEC="torch==2.5.1 --index-url <your CUDA wheel index>"
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch>=2.3,torch==2.13.0)
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo demo-full demo-photos demo-seeds demo-capacity demo-regimes chain bench clean-demo

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	# the distribution was called "refiner" before it became "window-refiner": drop the old editable install
	$(BIN)/python -m pip uninstall -q -y refiner 2>/dev/null || true
	$(BIN)/python -m pip install -q -e ".[test]"
	# taming-transformers' declared deps pull torchvision, which breaks this torch: install it alone
	$(BIN)/python -m pip install -q --no-deps taming-transformers-rom1504==0.0.6
	$(BIN)/python -c "import torch, pytorch_lightning, taming.modules.vqvae.quantize; print('torch', torch.__version__)"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# the cartoon-heads demo and its composition benchmark (DEMO=photos: the photo-crop experiment)
demo: setup
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh

# demo + the paired baseline + the benchmark's whole sweep on both seed splits: the numbers of docs/experiments/
demo-full: setup
	PATH="$(abspath $(BIN)):$$PATH" FULL=1 bash scripts/demo.sh

demo-photos: setup
	PATH="$(abspath $(BIN)):$$PATH" DEMO=photos bash scripts/demo.sh

# the demo's comparison over 5 training seeds with 95% intervals (docs/experiments/seeds.md; about 1 h on 2 cores):
# make demo first (its first stages and shards), then refiner bench-seeds into outputs/heads/seeds_study;
# re-run to continue after an interruption. SEEDS_ARGS: more settings of conf/seeds.yaml
demo-seeds: demo
	$(BIN)/python -m refiner bench-seeds resume=true $(SEEDS_ARGS)

# the seeds study over UNet widths x step budgets (docs/experiments/capacity.md; many hours on 2 cores, resumable:
# re-run to continue); the seeds study stands for the demo's own cell. CAPACITY_ARGS: more settings of conf/capacity.yaml
demo-capacity: demo-seeds
	$(BIN)/python -m refiner bench-capacity resume=true reuse=[outputs/heads/seeds_study] $(CAPACITY_ARGS)

# ASCED and DemoFusion in their own regimes (docs/experiments/asced.md, docs/experiments/upscaling.md). Both need a
# generator whose samples are mostly well formed; the demo's breaks 94%. A 64-channel full-range model at 4000 steps
# (about 25 min on 2 cores; 47% broken at 25 DDIM steps) is one; then bench-asced, and bench-upscale generating at
# 128 px from noise. Re-run to continue an interrupted training.
STRONG := outputs/heads/full_range_w64
demo-regimes: demo
	$(BIN)/python -m refiner train experiment=demo_full_range model.unet.model_channels=64 trainer.max_steps=4000 \
	  hydra.run.dir=$(STRONG) $(if $(wildcard $(STRONG)/checkpoints/last.ckpt),ckpt_path=$(STRONG)/checkpoints/last.ckpt)
	$(BIN)/python -m refiner bench-asced split=holdout n=256 "generator.experts=[$(STRONG)/checkpoints/last.ckpt]" \
	  output_dir=outputs/heads/bench_asced
	$(BIN)/python -m refiner bench-upscale split=holdout n=64 "upscale.target_sizes=[128]" "upscale.regimes=[noise]" \
	  "generator.experts=[$(STRONG)/checkpoints/last.ckpt]" output_dir=outputs/heads/bench_upscale_regime

# train a chain on your own images (docs/reference/chain.md): make chain DATA=path/to/images [OUT=folder]
# [ARGS="size=128 full_range=true"]; re-run the same command to continue after an interruption
chain: setup
	$(BIN)/python -m refiner chain $(if $(DATA),data=$(DATA)) $(if $(OUT),out=$(OUT)) $(ARGS)

bench: setup
	$(BIN)/python -m pip install -q "diffusers>=0.30"
	$(BIN)/python benchmarks/run_all.py

clean-demo:
	rm -rf data/heads data/photos data/shards/heads data/shards/photos outputs/heads outputs/photos

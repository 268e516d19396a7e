"""The ``refiner`` command: one entry point for every job, ``refiner <command> [arguments]`` (also
``python -m refiner <command> ...``).

| command | what it does | arguments |
|---|---|---|
| ``refine`` | refine images through a chain of window experts (``refine.py``) | Hydra overrides of ``conf/refine.yaml`` |
| ``train`` | train a window expert or a first-stage autoencoder (``train.py``) | Hydra overrides of ``conf/train.yaml`` |
| ``build-shards`` | image folders -> latent shards (``build_shards.py``) | Hydra overrides of ``conf/build_shards.yaml`` |
| ``chain`` | train a chain of window experts on your own image folder, end to end | Hydra overrides of ``conf/chain.yaml`` |
| ``bench`` | the composition benchmark (quality: artifact rates) | Hydra overrides of ``conf/bench.yaml`` |
| ``bench-artifacts`` | the benchmark's artifact detection and targeted correction | the same |
| ``bench-upscale`` | the benchmark's upscaling comparison | the same |
| ``bench-asced`` | ASCED's detection and correction during generation, at its own NFE | the same |
| ``bench-seeds`` | the benchmark over several training seeds, with intervals | Hydra overrides of ``conf/seeds.yaml`` |
| ``bench-capacity`` | the seeds study over UNet widths and step budgets | Hydra overrides of ``conf/capacity.yaml`` |
| ``export`` | window checkpoints -> ``.safetensors``, a diffusers folder or a peft adapter | ``--help`` |
| ``inspect`` | say what kind of checkpoint a file is | ``PATH`` |

The Hydra commands take the same flags as the scripts (``--cfg job``, ``-m`` for sweeps, ``hydra/launcher=...``). The
hyphenated console scripts of earlier versions (``refiner-train``, ``refiner-sample``, ...) still work and print one
deprecation line naming the new command; ``refiner-checkpoint export CKPT OUT`` is ``refiner export safetensors CKPT
OUT`` and ``refiner-checkpoint inspect PATH`` is ``refiner inspect PATH``.

Each command's module is imported only when it runs (with ``importlib``): importing every app would load Lightning,
peft and diffusers for a ``--help``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable

# command -> (module, function, one-line description)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "refine": ("refiner.apps.refine", "main", "refine images through a chain of window experts"),
    "train": ("refiner.apps.train", "main", "train a window expert or a first-stage autoencoder"),
    "build-shards": ("refiner.apps.build_shards", "main", "image folders -> latent shards for training"),
    "chain": ("refiner.apps.chain", "main", "train a chain of window experts on your own image folder, end to end"),
    "bench": ("refiner.apps.bench", "main", "the composition benchmark: artifact rates per method and source"),
    "bench-artifacts": ("refiner.apps.bench", "artifacts_main", "benchmark of artifact detection and targeted fixes"),
    "bench-upscale": ("refiner.apps.bench", "upscale_main", "benchmark of progressive vs bicubic-then-refine upscaling"),
    "bench-asced": ("refiner.apps.bench", "asced_main", "ASCED's detection and correction during generation at NFE 25/50"),
    "bench-seeds": ("refiner.apps.seeds", "main", "the benchmark over several training seeds, with intervals"),
    "bench-capacity": ("refiner.apps.capacity", "main", "the seeds study over UNet widths and step budgets"),
    "export": ("refiner.apps.export", "main", "export window experts (safetensors, diffusers, peft)"),
    "inspect": ("refiner.apps.export", "inspect_main", "say what kind of checkpoint a file is"),
}

# earlier console scripts -> the command they now are
OLD_SCRIPTS = {
    "refiner-train": "train",
    "refiner-sample": "refine",
    "refiner-build-shards": "build-shards",
    "refiner-bench": "bench",
    "refiner-export": "export",
    "refiner-checkpoint": "export",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: refiner <command> [arguments]  (refiner <command> --help for its settings)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, _, text) in COMMANDS.items()]
    return "\n".join(lines)


def resolve(command: str) -> Callable[[], object]:
    module, function, _ = COMMANDS[command]
    return getattr(importlib.import_module(module), function)


def run(command: str, argv: list[str], prog: str) -> object:
    """Run ``command`` with ``argv`` as its arguments (Hydra and argparse both read ``sys.argv``)."""
    sys.argv = [prog, *argv]
    return resolve(command)()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; the commands are {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    result = run(command, rest, f"refiner {command}")
    return int(result) if isinstance(result, int) else 0


def _deprecated_script(old: str) -> Callable[[], int]:
    def alias() -> int:
        new = OLD_SCRIPTS[old]
        argv = sys.argv[1:]
        shown = new
        if old == "refiner-checkpoint" and argv[:1] == ["inspect"]:
            new, shown, argv = "inspect", "inspect", argv[1:]
        elif old == "refiner-checkpoint" and argv[:1] == ["export"]:
            shown, argv = "export safetensors", ["safetensors", *argv[1:]]
        print(f"deprecated: {old} is now `refiner {shown}`", file=sys.stderr)
        result = run(new, argv, f"refiner {new}")
        return int(result) if isinstance(result, int) else 0

    return alias


train_alias = _deprecated_script("refiner-train")
sample_alias = _deprecated_script("refiner-sample")
build_shards_alias = _deprecated_script("refiner-build-shards")
bench_alias = _deprecated_script("refiner-bench")
export_alias = _deprecated_script("refiner-export")
checkpoint_alias = _deprecated_script("refiner-checkpoint")

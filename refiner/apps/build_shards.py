"""``build_shards.py`` / ``refiner build-shards``: image folders -> webdataset shards of clean images, their VQ-f8
round trips and the f4 latents of both. Checks every split, loads the f4/f8 first stages named by the config, and
shards each split (written to a temporary folder and renamed into place when complete).

Exit codes follow :mod:`refiner.cli`: 0 done, 1 some inputs failed, 2 a setting that cannot work (one ``error:``
line on stderr, before any split is written).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig

from refiner.apps.hydra_app import hydra_command, resolved
from refiner.cli import run_cli
from refiner.data.images import scan_images
from refiner.data.shards import ShardBuildError, build_shards, check_build_settings, check_shard_output
from refiner.formats.first_stage import first_stage_from_mapping
from refiner.io import same_file
from refiner.settings import check_device

log = logging.getLogger(__name__)


def load_first_stages(cfg: DictConfig):
    experts = {name: first_stage_from_mapping(resolved(cfg.first_stage.get(name)), name, cfg.trust_checkpoint,
                                              cfg.device) for name in ("f4", "f8")}
    if experts["f4"].factor != 4 or experts["f8"].factor != 8:
        raise ShardBuildError(f"first_stage.f4/f8 have factors {experts['f4'].factor}/{experts['f8'].factor}, "
                              "expected 4/8")
    return experts


def check_splits(cfg: DictConfig) -> None:
    """Everything that can be checked before any first stage is loaded or any shard written: the build
    settings, the device, and for every split its images and its output folder (distinct from every other
    split's, not an image folder, and holding no shard set unless ``overwrite``)."""
    check_build_settings(cfg.size, cfg.fit, cfg.batch_size, cfg.maxcount_per_shard)
    check_device(cfg.device)
    if not cfg.splits:
        raise ShardBuildError("splits is empty: give at least one {images, out} split")
    outs: dict[str, Path] = {}
    for split, spec in cfg.splits.items():
        if not spec or not spec.get("images") or not spec.get("out"):
            raise ShardBuildError(f"splits.{split} needs both images=<folder|glob> and out=<folder>")
        try:
            files, _ = scan_images(spec.images)
        except (FileNotFoundError, ValueError) as err:
            raise ShardBuildError(f"splits.{split}.images: {err}") from err
        out = Path(spec.out)
        clash = next((name for name, other in outs.items() if same_file(out, other)), None)
        if clash is not None:
            raise ShardBuildError(f"splits.{split}.out and splits.{clash}.out are the same folder {out}")
        outs[split] = out
        try:
            check_shard_output(out, cfg.overwrite, files)
        except (ShardBuildError, FileExistsError) as err:
            raise type(err)(f"splits.{split}.out: {err}") from err


def run(cfg: DictConfig) -> dict:
    check_splits(cfg)
    experts = load_first_stages(cfg)
    reports = {}
    for split, spec in cfg.splits.items():
        log.info("building %s shards: %s -> %s", split, spec.images, spec.out)
        reports[split] = build_shards(
            spec.images, spec.out, experts["f4"], experts["f8"], size=cfg.size, fit=cfg.fit,
            maxcount_per_shard=cfg.maxcount_per_shard, batch_size=cfg.batch_size, device=cfg.device,
            overwrite=cfg.overwrite,
        )
        r = reports[split]
        log.info("%s: %s", split, json.dumps({k: r[k] for k in r if k in ("num_samples", "num_shards", "skipped")},
                                             default=str)[:500])
    return reports


def exit_code(reports: dict) -> int:
    """1 if any image of any split was skipped (each is printed on stderr, and listed in its manifest), else 0.
    Non-image files passed over are printed too, but do not fail the build."""
    failed = 0
    for split, report in reports.items():
        for item in report["skipped"]:
            print(f"skipped ({split}): {item['file']}: {item['reason']}", file=sys.stderr)
            failed += 1
        for item in report["ignored"]:
            print(f"ignored ({split}): {item['file']}: {item['reason']}", file=sys.stderr)
    return 1 if failed else 0


def task(cfg: DictConfig) -> None:
    raise SystemExit(run_cli(lambda: exit_code(run(cfg))))


main = hydra_command("build_shards", task, output_key=None)

if __name__ == "__main__":
    main()

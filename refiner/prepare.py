"""Body of ``build_shards.py``: load the f4/f8 first stages named by the config and shard each split."""

from __future__ import annotations

import json
import logging

from omegaconf import DictConfig

from refiner.checkpoints import first_stage_from_config
from refiner.data.shards import build_shards

log = logging.getLogger(__name__)


def load_first_stages(cfg: DictConfig):
    stages = {name: first_stage_from_config(cfg.first_stage.get(name), name, cfg.trust_checkpoint, cfg.device)
              for name in ("f4", "f8")}
    if stages["f4"].factor != 4 or stages["f8"].factor != 8:
        raise ValueError(f"first_stage.f4/f8 have factors {stages['f4'].factor}/{stages['f8'].factor}, expected 4/8")
    return stages


def run(cfg: DictConfig) -> dict:
    stages = load_first_stages(cfg)
    reports = {}
    for split, spec in cfg.splits.items():
        log.info("building %s shards: %s -> %s", split, spec.images, spec.out)
        reports[split] = build_shards(
            spec.images, spec.out, stages["f4"], stages["f8"], size=cfg.size, fit=cfg.fit,
            maxcount_per_shard=cfg.maxcount_per_shard, batch_size=cfg.batch_size, device=cfg.device,
            overwrite=cfg.overwrite,
        )
        r = reports[split]
        log.info("%s: %s", split, json.dumps({k: r[k] for k in r if k in ("num_samples", "num_shards", "skipped")},
                                             default=str)[:500])
    return reports

"""``train.py`` / ``refiner train``: train a window expert or a first-stage autoencoder,
``python train.py experiment=<name> [overrides]``.

The Lightning entry point: compose (Hydra) -> validate inputs -> instantiate -> fit. Exit codes follow
:mod:`refiner.cli`: 0 done, 2 a setting, checkpoint or data path that cannot work (one ``error:`` line on stderr,
before any compute where possible).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from refiner.apps.hydra_app import hydra_command
from refiner.apps.instantiate import check_block, instantiate
from refiner.cli import run_cli
from refiner.data.latents import expand_shards, read_all_samples
from refiner.data.shards import MANIFEST, load_manifest
from refiner.diffusion import Window
from refiner.errors import SettingError
from refiner.formats.first_stage import first_stage_file_fingerprint
from refiner.formats.fingerprint import (
    check_fingerprints_agree,
    check_first_stage_match,
)
from refiner.formats.loading import load_init_weights
from refiner.formats.lora import base_reference
from refiner.formats.safe_load import safe_torch_load
from refiner.io import atomic_write_text
from refiner.lit.chain_validation import ChainValidation
from refiner.lit.checkpoint_io import AtomicCheckpointIO
from refiner.lit.interrupt import InterruptCheckpoint
from refiner.models.lora import LoraSettings
from refiner.settings import require_int

log = logging.getLogger(__name__)


class ConfigError(SettingError):
    """A config value that cannot work; raised before any compute."""


def _require_file(path: str | None, what: str, folder_ok: bool = False) -> None:
    """``folder_ok``: a folder is accepted too (a diffusers pipeline, ``unet/`` or ``vqvae/`` folder)."""
    if path and not (Path(path).is_file() or (folder_ok and Path(path).is_dir())):
        raise ConfigError(f"{what} not found: {path!r} (relative paths are relative to {os.getcwd()})")


# Lightning's ``seed_everything`` seeds numpy, whose seeds are 32-bit unsigned
SEED_RANGE = (0, 2**32 - 1)
GPU_ACCELERATORS = ("gpu", "cuda")


def validate(cfg: DictConfig) -> None:
    """Fail fast, before any compute, on the inputs users most often get wrong."""
    require_int("seed", cfg.seed, *SEED_RANGE)
    accelerator = cfg.trainer.get("accelerator")
    if isinstance(accelerator, str) and accelerator.lower() in GPU_ACCELERATORS and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator} but CUDA is not available on this machine (torch "
                          f"{torch.__version__}); use trainer=cpu (or trainer=ddp_cpu)")
    for key in ("data", "trainer"):  # keys and types before any compute (model: once scale_factor=auto is resolved)
        check_block(cfg[key], key)
    for name in cfg.get("required_paths") or []:
        value = cfg.paths.get(name)
        if not value:
            raise ConfigError(
                f"this experiment needs paths.{name}=<file>; see docs/reference/training.md, 'Finetuning from CompVis'"
            )
        _require_file(value, f"paths.{name}")
    if "window" in cfg.model:
        try:
            Window.from_config(OmegaConf.to_container(cfg.model.window, resolve=True),
                               int(cfg.model.schedule.num_timesteps))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"window: {err}") from err
    _require_file(cfg.get("ckpt_path"), "ckpt_path (checkpoint to resume from)")
    _require_file(cfg.get("init_from"), "init_from (checkpoint or diffusers folder to finetune from)", folder_ok=True)
    if cfg.get("ckpt_path") and cfg.get("init_from"):
        raise ConfigError("give either ckpt_path (resume) or init_from (finetune), not both")
    first_stage = cfg.model.get("first_stage")
    if first_stage and first_stage.get("ckpt_path"):
        _require_file(first_stage.ckpt_path, "model.first_stage.ckpt_path (f4 autoencoder for image grids)",
                      folder_ok=True)
    if lora_enabled(cfg) and not (cfg.get("init_from") or cfg.get("ckpt_path")):
        raise ConfigError(f"model.lora.rank={cfg.model.lora.rank} trains adapters on top of a base: give "
                          "init_from=<window checkpoint, CompVis LDM or diffusers folder> (or ckpt_path= to resume)")
    for path in (cfg.get("val") or {}).get("chain") or []:
        _require_file(path, "val.chain entry (an earlier window checkpoint)", folder_ok=False)


def lora_enabled(cfg: DictConfig) -> bool:
    """``model.lora`` validated (a bad value raises a one-line SettingError); True when rank > 0."""

    lora = cfg.model.get("lora")
    return LoraSettings.from_config(OmegaConf.to_container(lora, resolve=True) if lora is not None else None) is not None


def record_lora_base(cfg: DictConfig, state: dict | None) -> None:
    """Under ``model.lora``, record the ``init_from`` weights as the adapters' base (path, EMA, fingerprint)."""
    if state is None or not lora_enabled(cfg):
        return

    with open_dict(cfg):
        cfg.model.lora_base = base_reference(cfg.init_from, state, cfg.init_from_ema)


def instantiate_dict(cfg: DictConfig | None, where: str = "callbacks") -> list[Any]:
    """Instantiate every ``_target_`` entry of a name -> config mapping (``where``: callbacks, loggers)."""
    if not cfg:
        return []
    return [instantiate(c, f"{where}.{name}") for name, c in cfg.items() if c is not None and "_target_" in c]


def loggers_from(cfg: DictConfig | None, env: Mapping[str, str] | None = None) -> list[Any]:
    """The run's loggers. ``WANDB_MODE`` in the environment decides wandb's mode when it is set (the config's
    ``offline: true`` would otherwise override it): ``disabled`` drops the wandb logger, any other mode is passed on."""
    env = os.environ if env is None else env
    if not cfg:
        return []
    mode = env.get("WANDB_MODE")
    entries = []
    for name, c in cfg.items():
        if c is None or "_target_" not in c:
            continue
        if mode and str(c["_target_"]).endswith("WandbLogger"):
            if mode == "disabled":
                log.info("WANDB_MODE=disabled: no wandb logger for %s", name)
                continue
            c = OmegaConf.merge(c, {"offline": mode in ("offline", "dryrun")})
        entries.append(instantiate(c, f"logger.{name}"))
    return entries


def read_resume_info(cfg: DictConfig) -> dict | None:
    """Resume (``ckpt_path``): the recorded ``scale_factor`` of the run being resumed, so that
    ``model.scale_factor=auto`` takes the value the run was trained with (inherited from its ``init_from``, which
    a resume does not repeat) instead of recomputing it from the shards. None without ``ckpt_path``."""
    if not cfg.get("ckpt_path") or "unet" not in cfg.model:
        return None

    hp = (safe_torch_load(cfg.ckpt_path, cfg.trust_checkpoint).get("hyper_parameters") or {})
    return {"scale_factor": float(hp["scale_factor"]), "from": "ckpt_path"} if "scale_factor" in hp else None


def read_init_from(cfg: DictConfig) -> tuple[dict, dict] | tuple[None, None]:
    """Finetune source: (UNet state dict, info) from ``init_from``, or (None, None)."""
    if not cfg.get("init_from"):
        return None, None

    return load_init_weights(cfg.init_from, use_ema=cfg.init_from_ema, trust_checkpoint=cfg.trust_checkpoint)


def apply_init_from(model: pl.LightningModule, cfg: DictConfig, state: dict, info: dict) -> dict:
    """Finetune: copy only weights (from :func:`read_init_from`) into ``model.unet``, strictly (under
    ``model.lora``: into the frozen base under the adapters); optimizer and step start fresh."""
    model.load_base_weights(state, source=str(cfg.init_from))
    log.info("initialised weights from %s (%s)", cfg.init_from, info)
    return info


def resolve_scale_factor(cfg: DictConfig, init_info: dict | None = None, max_samples: int = 256) -> None:
    """``model.scale_factor=auto``: the finetuning source's factor if it has one (or, resuming, the resumed run's:
    ``init_info`` from :func:`read_resume_info`), else 1 / std of the first training latents (LDM's
    ``scale_by_std``).

    The first ``max_samples`` samples in shard order are the same files on every rank, so the value
    is identical everywhere by construction; ``WindowRefiner.on_fit_start`` checks it against rank 0.
    """
    inherited = (init_info or {}).get("scale_factor")
    source = (init_info or {}).get("from", "init_from")
    current = cfg.model.get("scale_factor")
    if str(current) != "auto":
        if inherited is not None and current is not None and abs(float(current) - inherited) > 1e-6:
            log.warning("model.scale_factor=%s differs from %s's %s: the window will not chain with its source",
                        current, source, inherited)
        return
    if inherited is not None:
        cfg.model.scale_factor = float(inherited)
        log.info("model.scale_factor=auto -> %.5f (from %s)", cfg.model.scale_factor, source)
        return
    samples = read_all_samples(expand_shards(cfg.data.train_shards), keys=("z_clean",), max_samples=max_samples)
    if not samples:
        raise ConfigError(f"model.scale_factor=auto: no readable samples in {cfg.data.train_shards}")
    z = torch.cat([s["z_clean"].double().flatten() for s in samples])
    cfg.model.scale_factor = float(1.0 / z.std())
    log.info("model.scale_factor=auto -> %.5f (1/std over %d training latents)", cfg.model.scale_factor, len(samples))


def _shards_first_stage_fingerprint(train_shards) -> tuple[str | None, str]:
    """The f4 fingerprint recorded in the training shards' ``manifest.json`` (None if absent) and its path."""

    folder = Path(expand_shards(train_shards)[0]).parent
    manifest = load_manifest(folder) or {}
    return (manifest.get("first_stage_fingerprints") or {}).get("f4"), str(folder / MANIFEST)


def resolve_first_stage_fingerprint(cfg: DictConfig, init_info: dict | None = None) -> str | None:
    """Set ``model.first_stage_fingerprint``: the identity of the f4 whose latents this window learns.

    Sources: ``model.first_stage.ckpt_path`` (the f4 of the validation grids) and the training shards'
    ``manifest.json`` (the f4 that encoded the latents); they must agree. A window ``init_from`` (or a CompVis
    LDM, through its ``first_stage_model``) must have been trained with the same f4. Mismatches raise
    :class:`~refiner.formats.fingerprint.FirstStageMismatch` unless ``allow_first_stage_mismatch=true``.
    """

    allow = bool(cfg.get("allow_first_stage_mismatch", False))
    named = []
    shards_fp, manifest = _shards_first_stage_fingerprint(cfg.data.train_shards)
    named.append((f"the training shards ({manifest})", shards_fp))
    first_stage = cfg.model.get("first_stage")
    if first_stage and first_stage.get("ckpt_path"):
        named.append((f"model.first_stage.ckpt_path={first_stage.ckpt_path}",
                      first_stage_file_fingerprint(first_stage.ckpt_path, cfg.trust_checkpoint)))
    fingerprint = check_fingerprints_agree(  # the shards' when both are known
        named, allow, why="the training latents were encoded by another f4 than the one that decodes the grids")
    if fingerprint is None:
        log.warning("no first-stage fingerprint known (no model.first_stage.ckpt_path, shards without one): this "
                    "window's checkpoint cannot be checked against the f4 it is used with")
    if init_info is not None and (fingerprint is not None or init_info.get("first_stage_fingerprint")):
        where = next((src for src, fp in named if fp == fingerprint), "this run's first stage")
        check_first_stage_match(init_info.get("first_stage_fingerprint"), f"init_from={cfg.init_from}",
                                fingerprint, where, allow)
    with open_dict(cfg):
        cfg.model.first_stage_fingerprint = fingerprint
    return fingerprint


def chain_validation(cfg: DictConfig) -> list:
    """The whole-chain validation callback when ``val.chain`` lists earlier windows (window runs only)."""
    val = cfg.get("val") or {}
    if not val.get("chain") or "unet" not in cfg.model:
        return []

    settings = OmegaConf.to_container(val, resolve=True)
    return [ChainValidation(**settings, trust_checkpoint=cfg.trust_checkpoint,
                            allow_first_stage_mismatch=bool(cfg.get("allow_first_stage_mismatch", False)))]


def run(cfg: DictConfig) -> dict:
    validate(cfg)
    # _convert_=all: the library gets plain dicts and lists, never config objects. The datamodule first: its settings
    # are checked on construction (one error line), before the scale factor reads any latents.
    datamodule = instantiate(cfg.data, "data", _convert_="all")
    init_state, init_info = read_init_from(cfg)
    if "unet" in cfg.model:
        resolve_scale_factor(cfg, init_info or read_resume_info(cfg))
        resolve_first_stage_fingerprint(cfg, init_info)
        record_lora_base(cfg, init_state)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # Lightning's "Seed set to" line on stderr: in our log
    log.info("seed %d (torch, numpy, random and the dataloader workers)", cfg.seed)
    output_dir = Path(cfg.paths.output_dir)

    model = instantiate(cfg.model, "model", _convert_="all")
    if init_state is not None:
        apply_init_from(model, cfg, init_state, init_info)

    loggers = loggers_from(cfg.get("logger"))
    interrupt = InterruptCheckpoint()
    callbacks = instantiate_dict(cfg.get("callbacks")) + chain_validation(cfg) + [interrupt]
    if not loggers:  # LearningRateMonitor refuses to run without a logger
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    if cfg.trainer.get("enable_progress_bar") is False:  # Lightning refuses a bar callback with bars disabled
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.ProgressBar)]
    trainer: pl.Trainer = instantiate(
        cfg.trainer, "trainer",
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[AtomicCheckpointIO(trust_checkpoint=cfg.trust_checkpoint)],
    )
    if trainer.is_global_zero:
        atomic_write_text(output_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except SystemExit:  # Lightning's SIGTERMException, or its sys.exit(1) after a KeyboardInterrupt
        if interrupt.path is None:
            raise
    if interrupt.path is not None:
        raise Interrupted(interrupt, trainer.is_global_zero, finetune=bool(cfg.get("init_from")))

    ckpt_cb = trainer.checkpoint_callback
    result = {
        "output_dir": str(output_dir),
        "global_step": trainer.global_step,
        "last_ckpt": getattr(ckpt_cb, "last_model_path", None),
        "best_ckpt": getattr(ckpt_cb, "best_model_path", None),
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }
    if trainer.is_global_zero:
        log.info("finished at step %d; last checkpoint: %s", result["global_step"], result["last_ckpt"])
    return result


class Interrupted(SystemExit):
    """Training stopped by SIGTERM/SIGINT after saving ``last.ckpt``: exit 128 + signal (143, 130), after one line
    (rank 0) naming the checkpoint and the command that resumes from it."""

    def __init__(self, interrupt: InterruptCheckpoint, announce: bool = True, finetune: bool = False):
        super().__init__(128 + int(interrupt.signal))
        if announce:
            print(f"interrupted by {interrupt.signal.name} at step {interrupt.step}: saved {interrupt.path}; resume "
                  f"with: {resume_command(interrupt.path, finetune)}", file=sys.stderr, flush=True)


def resume_command(ckpt: Path, finetune: bool = False) -> str:
    """The command line of this run with ``ckpt_path=<ckpt>`` and Hydra's run dir pinned to this run's folder (so the
    resumed run writes beside the interrupted one), as it can be pasted into a shell. A ``finetune`` (``init_from``
    set, perhaps by its experiment) resumes with ``init_from=null``: the checkpoint holds the weights, and train
    refuses both at once."""
    prog = sys.argv[0]
    head = ["python", prog] if prog.endswith(".py") else prog.split()
    pinned = ("ckpt_path=", "hydra.run.dir=", "init_from=")  # resume replaces finetuning
    args = [a for a in sys.argv[1:] if not a.lstrip("+~").startswith(pinned)]
    if HydraConfig.initialized():
        args.append(f"hydra.run.dir={HydraConfig.get().runtime.output_dir}")
    return shlex.join([*head, *args, f"ckpt_path={Path(ckpt).absolute()}", *(["init_from=null"] if finetune else [])])


def task(cfg: DictConfig) -> None:
    """The Hydra task: :func:`run` under :func:`refiner.cli.run_cli`'s exit-code contract."""
    raise SystemExit(run_cli(lambda: run(cfg) and 0))


main = hydra_command("train", task, output_key="paths.output_dir")

if __name__ == "__main__":
    main()

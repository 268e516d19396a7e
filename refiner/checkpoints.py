"""Every checkpoint that enters or leaves refiner.

* :func:`safe_torch_load`: ``torch.load(weights_only=True)`` with clear errors (missing, corrupt, pickled code).
* :func:`load_compvis_ldm`: a CompVis latent-diffusion ``model.ckpt`` (+ ``config.yaml``) -> UNet (EMA or raw),
  first stage, schedule buffers.
* :func:`load_first_stage` / :func:`build_first_stage`: CompVis vq-f4/vq-f8 or taming VQGAN weights -> ``VQModel``.
* :func:`load_window_checkpoint`, :func:`export_safetensors`, :func:`load_window_weights`: our own window experts.
* :func:`load_init_weights`: "init_from" for finetuning; accepts any denoiser checkpoint above.

CompVis LDM checkpoint layout (Lightning ``state_dict``): ``model.diffusion_model.*`` (UNet),
``model_ema.<name without dots>`` (LitEma copies of each parameter of ``model``) plus ``model_ema.decay``
and ``model_ema.num_updates``, ``first_stage_model.*``, ``cond_stage_model.*`` and top-level schedule buffers.

CLI: ``python -m refiner.checkpoints export CKPT OUT.safetensors [--force]`` and
``python -m refiner.checkpoints inspect PATH``. Export never writes onto its input (any path spelling or
link) and replaces an existing output only with ``--force``; errors are one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from refiner.diffusion import PARAMETERIZATIONS, ScheduleConfig, Window
from refiner.errors import SettingError
from refiner.formats.fingerprint import FINGERPRINT_KEY, first_stage_fingerprint
from refiner.io import atomic_save, check_output_path

log = logging.getLogger(__name__)

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_EMA_PREFIX = "model_ema."
LDM_FIRST_STAGE_PREFIX = "first_stage_model."
LDM_COND_STAGE_PREFIX = "cond_stage_model."
WINDOW_UNET_PREFIX = "unet."
EXPORT_FORMAT = "refiner-window"
# CompVis DDPM.register_schedule buffers (ldm/models/diffusion/ddpm.py) and other known top-level extras.
LDM_SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights",
)
LDM_OTHER_BUFFERS = ("scale_factor", "cond_ids")
# VQModel constructor arguments; the rest of a CompVis first_stage_config.params is training-only.
VQ_ARGS = ("ddconfig", "n_embed", "embed_dim", "beta", "remap", "sane_index_shape")
VQ_TRAINING_ONLY_ARGS = (
    "lossconfig", "ckpt_path", "ignore_keys", "image_key", "colorize_nlabels", "monitor", "batch_resize_range",
    "scheduler_config", "lr_g_factor", "use_ema",
)
# DDPM.__init__ defaults, used when a CompVis config omits them.
COMPVIS_SCHEDULE_DEFAULTS = dict(timesteps=1000, beta_schedule="linear", linear_start=1e-4, linear_end=2e-2,
                                 cosine_s=8e-3)


class CheckpointError(SettingError):
    """A checkpoint file is missing, corrupt, unsafe to unpickle, or not the kind that was expected."""


# ----------------------------------------------------------------------------------------------
# Safe loading
# ----------------------------------------------------------------------------------------------
class _InertGlobal:
    """Stand-in for classes that old Lightning checkpoints reference only as callback-state keys.

    CompVis checkpoints (PL 1.x) key ``callbacks`` by the callback *class*; mapping those names to
    this empty class lets ``weights_only=True`` read them without importing or running anything.
    """


_INERT_GLOBAL_NAMES = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.lr_monitor.LearningRateMonitor",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
)


def _allowed_data_globals() -> list:
    """numpy scalars/dtypes that old checkpoints store (e.g. a ``best_model_score``): data, not code."""
    import numpy as np

    out: list = [(_InertGlobal, name) for name in _INERT_GLOBAL_NAMES]
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    out += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    out += [type(np.dtype(t)) for t in ("f4", "f8", "i4", "i8")]
    return out


def _unsafe_globals(path: Path, err: Exception) -> list[str]:
    """Names of the globals that made a ``weights_only`` load fail; empty if it failed for another reason."""
    if zipfile.is_zipfile(path):
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            return []
        allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in _allowed_data_globals()}
        return [name for name in found if name not in allowed]
    # legacy (non-zip) format: only the error message names the global
    return re.findall(r"Unsupported global: GLOBAL (\S+)", str(err))


def safe_torch_load(path: str | os.PathLike, trust_checkpoint: bool = False, map_location="cpu") -> Any:
    """``torch.load`` that refuses pickled code unless ``trust_checkpoint=True``.

    Raises :class:`CheckpointError` for a missing file, a truncated/corrupt file, or a file that needs
    full unpickling (naming the offending globals and how to allow it).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if _is_safetensors(path, by_suffix=False):
        raise CheckpointError(f"{path} is a safetensors file (a refiner window export?), not a torch checkpoint; "
                              "pass it where windows are expected (stages=, init_from=), which read it by content")
    try:
        if trust_checkpoint:
            return torch.load(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(_allowed_data_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(path, err)
        if unsafe:
            raise CheckpointError(
                f"{path}: refusing to unpickle arbitrary objects (it pickles {', '.join(unsafe[:5])}). Loading it "
                "runs code named in the file; if (and only if) you trust this file, pass trust_checkpoint=true "
                "to allow full unpickling."
            ) from err
        _raise_if_whole_pickle(path, err, trust_checkpoint)
        raise CheckpointError(f"{path} is truncated or corrupt ({str(err).splitlines()[0][:200]})") from err
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError) as err:
        _raise_if_whole_pickle(path, err, trust_checkpoint)
        raise CheckpointError(f"{path} is truncated or corrupt ({type(err).__name__}: {str(err)[:200]})") from err


TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickled value of a legacy (non-zip) torch.save file
LEGACY_HEADER_PICKLES = 4  # magic number, protocol version, sys_info, then the object itself


def _scan_pickles(path: Path, limit: int) -> tuple[int, Any]:
    """Parse (never execute) up to ``limit`` consecutive pickles at the start of ``path`` with ``pickletools``:
    returns how many are complete and the first value of the first one (its first argument-bearing opcode)."""
    import pickletools

    complete, first = 0, None
    try:
        with open(path, "rb") as f:
            while complete < limit:
                for op, arg, _ in pickletools.genops(f):
                    if complete == 0 and first is None and arg is not None and op.name not in ("PROTO", "FRAME"):
                        first = arg
                    if op.name == "STOP":
                        complete += 1
                        break
                else:
                    break
    except (ValueError, EOFError, OSError, UnicodeDecodeError):
        pass
    return complete, first


def _raise_if_whole_pickle(path: Path, err: Exception, trust_checkpoint: bool) -> None:
    """A non-zip file whose pickles are intact was refused, not cut short: say what it is instead of
    "truncated or corrupt". (A legacy torch file whose storage bytes are cut short still counts as corrupt.)"""
    if zipfile.is_zipfile(path):
        return
    complete, first = _scan_pickles(path, LEGACY_HEADER_PICKLES)
    unsupported = re.search(r"Unsupported (?:operand|global)[^\n]*", str(err))
    reason = unsupported.group(0) if unsupported else (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
    if first == TORCH_LEGACY_MAGIC:
        if complete == LEGACY_HEADER_PICKLES and isinstance(err, pickle.UnpicklingError) and not trust_checkpoint:
            raise CheckpointError(
                f"{path} is an old-format (non-zip) torch checkpoint that the safe loader refuses ({reason}): the "
                "refusal, not damage, stopped the load. Loading it needs full unpickling, which runs code named in the file: pass "
                "trust_checkpoint=true only if you trust it, or re-save it with a current torch.save") from err
        return
    if complete >= 1:
        raise CheckpointError(
            f"{path} is a plain Python pickle (pickle.dump), not a torch checkpoint ({reason}); "
            + ("torch.load cannot read it. " if trust_checkpoint else
               "refused as unsafe (unpickling it would run code named in the file), and torch.load could not read it "
               "even with trust_checkpoint=true. ")
            + "Re-save the weights with torch.save from code you trust") from err


# ----------------------------------------------------------------------------------------------
# Strict loading with readable errors
# ----------------------------------------------------------------------------------------------
def _mismatch_report(expected: Mapping[str, torch.Size], state_dict: Mapping[str, Tensor]) -> str | None:
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or shapes):
        return None
    parts = [f"{len(missing)} missing keys (first 5: {missing[:5]})", f"{len(unexpected)} unexpected keys "
             f"(first 5: {unexpected[:5]})"]
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (first 5: {'; '.join(shapes[:5])})")
    return ", ".join(parts)


def load_strict(module: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """``module.load_state_dict(state_dict, strict=True)``; a mismatch raises :class:`CheckpointError`
    naming ``source``, the architecture, missing/unexpected key counts (first 5 each) and shape mismatches."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    report = _mismatch_report(expected, state_dict)
    if report:
        raise CheckpointError(f"{source} does not fit {type(module).__name__}: {report}")
    module.load_state_dict(state_dict, strict=True)


def check_unet_state(state_dict: Mapping[str, Tensor], unet_params: dict, source: str) -> None:
    """Check keys and shapes against ``UNetModel(**unet_params)`` built on the meta device (no memory)."""
    from refiner.models.unet import UNetModel

    try:
        with torch.device("meta"):
            model = UNetModel(**unet_params)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: its UNet parameters do not build a refiner UNetModel: {err}") from err
    report = _mismatch_report({k: v.shape for k, v in model.state_dict().items()}, state_dict)
    if report:
        raise CheckpointError(f"{source} does not fit UNetModel(**{unet_params}): {report}")


# ----------------------------------------------------------------------------------------------
# What kind of checkpoint is this?
# ----------------------------------------------------------------------------------------------
def _state_dict_of(obj: Any) -> dict | None:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return dict(obj["state_dict"])
    if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return dict(obj)
    return None


def describe_checkpoint(obj: Any) -> str:
    """One of ``window``, ``compvis_ldm``, ``first_stage``, ``unet_state_dict``, ``unknown``."""
    hp = obj.get("hyper_parameters") if isinstance(obj, Mapping) else None
    if isinstance(hp, Mapping) and "window" in hp and "unet" in hp:
        return "window"
    sd = _state_dict_of(obj)
    if sd is None:
        return "unknown"
    if any(k.startswith(LDM_UNET_PREFIX) for k in sd):
        return "compvis_ldm"
    if any(k.startswith(("encoder.", "decoder.", "quantize.")) for k in sd):
        return "first_stage"
    if "time_embed.0.weight" in sd:
        return "unet_state_dict"
    return "unknown"


_KIND_TEXT = {
    "window": "a refiner window checkpoint",
    "compvis_ldm": "a CompVis latent-diffusion checkpoint",
    "first_stage": "a first-stage (VQ) checkpoint (encoder./decoder./quantize. keys)",
    "unet_state_dict": "a bare UNet state dict",
    "unknown": "not a recognised checkpoint",
}


def _kind_text(obj: Any) -> str:
    kind = describe_checkpoint(obj)
    if kind != "unknown":
        return _KIND_TEXT[kind]
    sd = _state_dict_of(obj)
    if sd:
        names = sorted({k.split(".")[0] for k in sd})
    elif isinstance(obj, Mapping):
        names = sorted(map(str, obj))
    else:
        names = [type(obj).__name__]
    return f"{_KIND_TEXT['unknown']} (top-level names: {names[:6]})"


def _strip(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _prefix_summary(keys, depth: int = 2) -> str:
    counts = Counter(".".join(k.split(".")[:depth]) for k in keys)
    return ", ".join(f"{p}.* ({n})" for p, n in sorted(counts.items()))


# ----------------------------------------------------------------------------------------------
# CompVis latent diffusion
# ----------------------------------------------------------------------------------------------
@dataclass
class LDMCheckpoint:
    """Pieces of a CompVis LDM checkpoint, ready for ``load_state_dict(strict=True)``."""

    source: str
    unet: dict[str, Tensor]
    first_stage: dict[str, Tensor]
    alphas_cumprod: Tensor  # as stored (float32 in CompVis files), widened to float64
    betas: Tensor | None
    global_step: int | None
    used_ema: bool
    unet_params: dict | None = None  # model.params.unet_config.params
    first_stage_params: dict | None = None  # ddconfig, n_embed, embed_dim (VQModel arguments)
    schedule: ScheduleConfig | None = None  # from config.yaml, or inferred from a linear ``betas``
    conditioning_key: str | None = None
    scale_factor: float | None = None
    config: dict | None = field(default=None, repr=False)


def ema_key(unet_key: str) -> str:
    """LitEma name of a UNet parameter: ``time_embed.0.weight`` -> ``model_ema.diffusion_modeltime_embed0weight``.

    LitEma registers each parameter of the wrapper ``model`` (whose child is ``diffusion_model``)
    under ``name.replace('.', '')``.
    """
    return LDM_EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def load_compvis_config(config_path: str | os.PathLike) -> dict:
    """Read a CompVis ``config.yaml`` into plain containers."""
    from omegaconf import OmegaConf

    path = Path(config_path)
    if not path.is_file():
        raise CheckpointError(f"config not found: {path}")
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable YAML config ({err})") from err
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise CheckpointError(f"{path}: expected a CompVis config with a top-level 'model' block")
    return cfg


def _vq_params(params: Mapping, source: str) -> dict:
    unknown = sorted(set(params) - set(VQ_ARGS) - set(VQ_TRAINING_ONLY_ARGS))
    if unknown:
        raise CheckpointError(f"{source}: unknown first-stage parameters {unknown}; VQModel takes {list(VQ_ARGS)}")
    missing = [k for k in ("ddconfig", "n_embed", "embed_dim") if k not in params]
    if missing:
        raise CheckpointError(f"{source}: first-stage parameters lack {missing}")
    return {k: params[k] for k in VQ_ARGS if k in params}


def _schedule_from_ldm_params(params: Mapping, source: str) -> ScheduleConfig | None:
    p = {**COMPVIS_SCHEDULE_DEFAULTS, **{k: params[k] for k in COMPVIS_SCHEDULE_DEFAULTS if k in params}}
    if p["beta_schedule"] not in ("linear", "cosine"):
        warnings.warn(f"{source}: beta_schedule={p['beta_schedule']!r} has no refiner equivalent; schedule=None")
        return None
    return ScheduleConfig(kind=p["beta_schedule"], num_timesteps=int(p["timesteps"]),
                          linear_start=float(p["linear_start"]), linear_end=float(p["linear_end"]),
                          cosine_s=float(p["cosine_s"]))


def _infer_linear_schedule(betas: Tensor) -> ScheduleConfig | None:
    """The CompVis 'linear' schedule has betas[0] = linear_start and betas[-1] = linear_end exactly."""
    cand = ScheduleConfig("linear", len(betas), float(betas[0]), float(betas[-1]))
    return cand if torch.allclose(cand.betas(), betas.double(), rtol=1e-5, atol=1e-8) else None


def load_compvis_ldm(
    ckpt_path: str | os.PathLike,
    use_ema: bool = True,
    config_path: str | os.PathLike | None = None,
    trust_checkpoint: bool = False,
) -> LDMCheckpoint:
    """Split a CompVis LDM checkpoint into UNet (EMA by default), first stage and schedule.

    With ``config_path`` the UNet weights are checked (keys and shapes) against
    ``UNetModel(**unet_config.params)`` and the config's schedule against the stored ``alphas_cumprod``.
    """
    source = str(ckpt_path)
    obj = safe_torch_load(ckpt_path, trust_checkpoint)
    return _ldm_from_obj(obj, source, use_ema, config_path)


def _ldm_from_obj(obj: Any, source: str, use_ema: bool, config_path=None) -> LDMCheckpoint:
    if describe_checkpoint(obj) != "compvis_ldm":
        raise CheckpointError(f"{source} is {_kind_text(obj)}, not a CompVis LDM checkpoint "
                              f"(no '{LDM_UNET_PREFIX}*' keys)")
    sd = _state_dict_of(obj)
    raw = _strip(sd, LDM_UNET_PREFIX)
    ema_names = {k: ema_key(k) for k in raw}
    present = [k for k, e in ema_names.items() if e in sd]
    used_ema = False
    unet = raw
    if use_ema:
        if not present:
            warnings.warn(f"{source}: use_ema=True but the checkpoint has no model_ema.* weights; using raw weights")
        elif len(present) != len(raw):
            missing = [ema_names[k] for k in raw if ema_names[k] not in sd]
            raise CheckpointError(f"{source}: EMA weights incomplete: {len(missing)} of {len(raw)} missing "
                                  f"(first 5: {missing[:5]}); pass use_ema=false to use the raw weights")
        else:
            unet, used_ema = {k: sd[e] for k, e in ema_names.items()}, True

    ema_known = set(ema_names.values()) | {LDM_EMA_PREFIX + "decay", LDM_EMA_PREFIX + "num_updates"}
    known = set(LDM_SCHEDULE_BUFFERS) | set(LDM_OTHER_BUFFERS) | ema_known
    used_prefixes = (LDM_UNET_PREFIX, LDM_FIRST_STAGE_PREFIX)
    leftovers = [k for k in sd if k not in known and not k.startswith(used_prefixes)]
    cond = [k for k in leftovers if k.startswith(LDM_COND_STAGE_PREFIX)]
    ddim = [k for k in leftovers if k.startswith("ddim_")]
    other = [k for k in leftovers if k not in cond and k not in ddim]
    if cond:
        log.info("%s: ignored %d cond_stage_model.* keys (refiner is unconditional or concat-conditioned)",
                 source, len(cond))
    if ddim:
        log.info("%s: ignored %d leftover ddim_* buffers", source, len(ddim))
    if other:
        log.warning("%s: ignored %d unrecognised keys (first 5: %s)", source, len(other), other[:5])

    if "alphas_cumprod" not in sd:
        raise CheckpointError(f"{source}: LDM checkpoint has no 'alphas_cumprod' schedule buffer")
    first_stage = {k: v for k, v in _strip(sd, LDM_FIRST_STAGE_PREFIX).items() if not k.startswith("loss.")}
    betas = sd.get("betas")
    result = LDMCheckpoint(
        source=source, unet=unet, first_stage=first_stage, alphas_cumprod=sd["alphas_cumprod"].double(),
        betas=None if betas is None else betas.double(), global_step=_int_or_none(obj.get("global_step")),
        used_ema=used_ema, scale_factor=float(sd["scale_factor"]) if "scale_factor" in sd else None,
    )
    if config_path is not None:
        _apply_ldm_config(result, load_compvis_config(config_path), str(config_path))
    elif betas is not None:
        result.schedule = _infer_linear_schedule(betas)
    return result


def _apply_ldm_config(result: LDMCheckpoint, cfg: dict, cfg_source: str) -> None:
    params = cfg["model"].get("params") or {}
    unet_cfg, fs_cfg = params.get("unet_config"), params.get("first_stage_config")
    if not isinstance(unet_cfg, dict) or "params" not in unet_cfg:
        raise CheckpointError(f"{cfg_source}: model.params.unet_config.params is missing")
    target = str(unet_cfg.get("target", ""))
    if target and not target.endswith("openaimodel.UNetModel"):
        raise CheckpointError(f"{cfg_source}: unet_config.target={target!r}; refiner loads openaimodel.UNetModel only")
    result.config = cfg
    result.unet_params = dict(unet_cfg["params"])
    check_unet_state(result.unet, result.unet_params, f"{result.source} (with {cfg_source})")
    if isinstance(fs_cfg, dict) and "params" in fs_cfg:
        result.first_stage_params = _vq_params(fs_cfg["params"], cfg_source)
    result.conditioning_key = params.get("conditioning_key")
    if result.scale_factor is None and "scale_factor" in params:
        result.scale_factor = float(params["scale_factor"])
    result.schedule = _schedule_from_ldm_params(params, cfg_source)
    if result.schedule is not None:
        ab = result.schedule.alphas_cumprod()
        if ab.shape != result.alphas_cumprod.shape or not torch.allclose(ab, result.alphas_cumprod, atol=1e-6):
            warnings.warn(f"{cfg_source}: the config's schedule {result.schedule} does not match the "
                          f"alphas_cumprod stored in {result.source}; the stored buffer is authoritative")


def _int_or_none(v) -> int | None:
    return None if v is None else int(v)


# ----------------------------------------------------------------------------------------------
# First stage (VQ)
# ----------------------------------------------------------------------------------------------
def load_first_stage(ckpt_path: str | os.PathLike, trust_checkpoint: bool = False) -> dict[str, Tensor]:
    """VQModel weights from a CompVis vq-f4/vq-f8 or taming VQGAN checkpoint (Lightning or raw state
    dict), or the ``first_stage_model.*`` part of an LDM checkpoint. Training-only ``loss.*`` keys
    (discriminator, LPIPS, logvar) are dropped and reported through ``logging``. A folder is read as a
    diffusers ``VQModel`` (e.g. ``<pipeline>/vqvae``) and returned in our layout."""
    source = str(ckpt_path)
    if Path(ckpt_path).is_dir():
        from refiner.formats.diffusers import load_diffusers_vq

        return load_diffusers_vq(ckpt_path).state_dict()
    obj = safe_torch_load(ckpt_path, trust_checkpoint)
    kind = describe_checkpoint(obj)
    sd = _state_dict_of(obj)
    if kind == "compvis_ldm":
        sd = _strip(sd, LDM_FIRST_STAGE_PREFIX)
        if not sd:
            raise CheckpointError(f"{source}: LDM checkpoint has no first_stage_model.* weights")
    elif kind != "first_stage":
        raise CheckpointError(f"{source} is {_kind_text(obj)}, not a first-stage (VQ) checkpoint")
    dropped = [k for k in sd if k.startswith("loss.")]
    if dropped:
        log.info("%s: dropped %d training-only keys: %s", source, len(dropped), _prefix_summary(dropped))
    return {k: v for k, v in sd.items() if not k.startswith("loss.")}


def first_stage_file_fingerprint(ckpt_path: str | os.PathLike, trust_checkpoint: bool = False) -> str:
    """:func:`refiner.formats.fingerprint.first_stage_fingerprint` of a first-stage checkpoint file (any layout
    :func:`load_first_stage` reads; its ``loss.*`` keys do not count)."""
    return first_stage_fingerprint(load_first_stage(ckpt_path, trust_checkpoint))


def build_first_stage(ckpt_path: str | os.PathLike | None = None, config: Mapping | None = None,
                      trust_checkpoint: bool = False):
    """``VQModel(**config)`` loaded strictly from ``ckpt_path`` (random init if no path).

    ``config`` is a CompVis ``first_stage_config.params`` (ddconfig, n_embed, embed_dim; training-only
    entries such as ``lossconfig`` are ignored) or a ``{target, params}`` block around it. A folder
    ``ckpt_path`` is read as a diffusers ``VQModel`` (its config.json decides the architecture).
    """
    from refiner.models.vq import VQModel

    if config is None:
        raise CheckpointError("build_first_stage needs config (ddconfig, n_embed, embed_dim)")
    config = dict(config)
    if "params" in config and "ddconfig" not in config:
        config = dict(config["params"])
    if ckpt_path is not None and Path(ckpt_path).is_dir():  # a diffusers VQModel folder (e.g. <pipeline>/vqvae)
        from refiner.formats.diffusers import load_diffusers_vq

        return load_diffusers_vq(ckpt_path, expected_params=config)
    model = VQModel(**_vq_params(config, f"first-stage config for {ckpt_path}"))
    if ckpt_path is not None:
        load_strict(model, load_first_stage(ckpt_path, trust_checkpoint), source=str(ckpt_path))
    return model


def first_stage_from_config(block: Any, name: str, trust_checkpoint: bool = False, device="cpu") -> nn.Module:
    """The trained ``VQModel`` of a ``first_stage.<name>`` config block ``{ckpt_path, params}``, in eval mode.

    A missing ``ckpt_path`` is refused: a randomly initialised autoencoder would silently produce noise.
    """
    from omegaconf import DictConfig, OmegaConf

    if block is None or block.get("ckpt_path") in (None, ""):
        raise CheckpointError(f"first_stage.{name}.ckpt_path is not set: point it at a VQ-{name} checkpoint "
                              f"(e.g. first_stage=compvis paths.vq_{name}=/path/to/vq-{name}/model.ckpt)")
    params = block["params"]
    params = OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig) else dict(params)
    return build_first_stage(block["ckpt_path"], params, trust_checkpoint=trust_checkpoint).to(device).eval()


# ----------------------------------------------------------------------------------------------
# Our window experts
# ----------------------------------------------------------------------------------------------
@dataclass
class WindowWeights:
    """A trained window expert: UNet weights and everything needed to rebuild and place it."""

    unet_state: dict[str, Tensor]
    unet_params: dict
    window: Window
    schedule: ScheduleConfig
    parameterization: str
    global_step: int | None
    source: str
    has_ema: bool
    conditioning: str | None = None
    scale_factor: float = 1.0
    # refiner.formats.fingerprint of the VQ-f4 the window was trained with; None for older checkpoints
    first_stage_fingerprint: str | None = None

    def build_unet(self):
        """``UNetModel(**unet_params)`` with these weights loaded strictly, in eval mode."""
        from refiner.models.unet import UNetModel

        model = UNetModel(**self.unet_params)
        load_strict(model, self.unet_state, self.source)
        return model.eval()


def _dataclass_from(cls, values: Any, what: str, source: str):
    if not isinstance(values, Mapping):
        raise CheckpointError(f"{source}: hyper_parameters['{what}'] must be a mapping, got {type(values).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise CheckpointError(f"{source}: hyper_parameters['{what}'] has unknown fields {unknown}; expected {sorted(names)}")
    try:
        return cls(**dict(values))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: invalid hyper_parameters['{what}']: {err}") from err


def _window_from_obj(obj: Any, source: str, use_ema: bool) -> WindowWeights:
    if describe_checkpoint(obj) != "window":
        raise CheckpointError(f"{source} is {_kind_text(obj)}, not a refiner window checkpoint "
                              "(expected hyper_parameters with 'unet' and 'window')")
    hp = obj["hyper_parameters"]
    missing = [k for k in ("unet", "window", "schedule", "parameterization") if k not in hp]
    if missing:
        raise CheckpointError(f"{source}: hyper_parameters lack {missing}")
    if hp["parameterization"] not in PARAMETERIZATIONS:
        raise CheckpointError(f"{source}: parameterization {hp['parameterization']!r} not in {PARAMETERIZATIONS}")
    has_ema = isinstance(obj.get("current_model_state"), Mapping)
    if use_ema and not has_ema:
        warnings.warn(f"{source}: use_ema=True but the checkpoint holds no EMA weights "
                      "(no current_model_state); using the raw weights")
    states = obj["current_model_state"] if (has_ema and not use_ema) else obj.get("state_dict")
    unet_state = _strip(states or {}, WINDOW_UNET_PREFIX)
    if not unet_state:
        raise CheckpointError(f"{source}: no '{WINDOW_UNET_PREFIX}*' weights in the checkpoint")
    unet_params = dict(hp["unet"])
    check_unet_state(unet_state, unet_params, source)
    return WindowWeights(
        unet_state=unet_state, unet_params=unet_params,
        window=_dataclass_from(Window, hp["window"], "window", source),
        schedule=_dataclass_from(ScheduleConfig, hp["schedule"], "schedule", source),
        parameterization=hp["parameterization"], global_step=_int_or_none(obj.get("global_step")),
        source=source, has_ema=has_ema and use_ema, conditioning=hp.get("conditioning"),
        scale_factor=float(hp.get("scale_factor", 1.0)), first_stage_fingerprint=_fingerprint_or_none(
            hp.get(FINGERPRINT_KEY), source),
    )


def _fingerprint_or_none(value: Any, source: str) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise CheckpointError(f"{source}: {FINGERPRINT_KEY} must be a string, got {type(value).__name__}")
    return value


def load_window_checkpoint(path: str | os.PathLike, use_ema: bool = True,
                           trust_checkpoint: bool = False) -> WindowWeights:
    """A window expert from our Lightning ``.ckpt``: EMA weights (``state_dict``) by default, raw ones
    (``current_model_state``) with ``use_ema=False``."""
    return _window_from_obj(safe_torch_load(path, trust_checkpoint), str(path), use_ema)


def export_safetensors(ckpt_path: str | os.PathLike, out_path: str | os.PathLike, use_ema: bool = True,
                       trust_checkpoint: bool = False, force: bool = False) -> Path:
    """Write a window expert's UNet weights (EMA by default) to one ``.safetensors`` file, atomically.

    ``out_path`` must not be ``ckpt_path`` (compared by inode: any spelling, symlink or hard link) and must
    not exist unless ``force`` (:func:`refiner.io.check_output_path`); both are checked before reading.

    Metadata (all strings): format, window, schedule, unet_params (JSON), parameterization,
    conditioning, scale_factor, global_step, ema, first_stage_fingerprint ("" when unknown).
    """
    from safetensors.torch import save_file

    out_path = check_output_path(out_path, inputs=[ckpt_path], force=force, what="export output")
    ww = load_window_checkpoint(ckpt_path, use_ema=use_ema, trust_checkpoint=trust_checkpoint)
    tensors = {k: v.detach().contiguous().clone() for k, v in ww.unet_state.items()}
    metadata = {
        "format": EXPORT_FORMAT,
        "format_version": "1",
        "window": json.dumps(ww.window.to_dict()),
        "schedule": json.dumps(ww.schedule.to_dict()),
        "unet_params": json.dumps(ww.unet_params),
        "parameterization": ww.parameterization,
        "conditioning": json.dumps(ww.conditioning),
        "scale_factor": repr(ww.scale_factor),
        "global_step": "" if ww.global_step is None else str(ww.global_step),
        "ema": "true" if ww.has_ema else "false",
        FINGERPRINT_KEY: ww.first_stage_fingerprint or "",
    }
    atomic_save(out_path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    log.info("exported %s (%s weights, window %s) to %s", ckpt_path, "EMA" if ww.has_ema else "raw", ww.window,
             out_path)
    return out_path


def _load_export(path: Path) -> WindowWeights:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        if zipfile.is_zipfile(path):
            raise CheckpointError(f"{path} is a torch (zip) checkpoint, not a safetensors file; rename it to .ckpt "
                                  "(refiner reads safetensors by content)") from err
        raise CheckpointError(f"{path} is truncated or corrupt (not a readable safetensors file: {err})") from err
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path}: safetensors metadata format={meta.get('format')!r}, "
                              f"expected {EXPORT_FORMAT!r} (written by refiner.checkpoints.export_safetensors)")
    try:
        unet_params = json.loads(meta["unet_params"])
        ww = WindowWeights(
            unet_state=tensors, unet_params=unet_params,
            window=Window(**json.loads(meta["window"])), schedule=ScheduleConfig(**json.loads(meta["schedule"])),
            parameterization=meta["parameterization"],
            global_step=int(meta["global_step"]) if meta.get("global_step") else None,
            source=str(path), has_ema=meta.get("ema") == "true",
            conditioning=json.loads(meta.get("conditioning", "null")), scale_factor=float(meta.get("scale_factor", 1)),
            first_stage_fingerprint=_fingerprint_or_none(meta.get(FINGERPRINT_KEY), str(path)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: broken refiner-window metadata ({type(err).__name__}: {err})") from err
    check_unet_state(tensors, unet_params, str(path))
    return ww


def load_window_weights(path: str | os.PathLike, use_ema: bool = True, trust_checkpoint: bool = False) -> WindowWeights:
    """A window expert from an exported ``.safetensors`` file or our Lightning ``.ckpt``.

    ``use_ema`` only applies to ``.ckpt`` files (an export holds the weights it was written with).
    """
    path = Path(path)
    if _is_safetensors(path):
        return _load_export(path)
    return load_window_checkpoint(path, use_ema=use_ema, trust_checkpoint=trust_checkpoint)


def _is_safetensors(path: Path, by_suffix: bool = True) -> bool:
    """By suffix (unless ``by_suffix=False``), or by content: 8-byte little-endian header length followed by
    a JSON ``{``."""
    if by_suffix and path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


# ----------------------------------------------------------------------------------------------
# init_from for finetuning
# ----------------------------------------------------------------------------------------------
def load_init_weights(path: str | os.PathLike, use_ema: bool = True,
                      trust_checkpoint: bool = False) -> tuple[dict[str, Tensor], dict]:
    """UNet weights to start finetuning from: our window ``.ckpt``, an exported ``.safetensors``, a
    CompVis LDM ``.ckpt`` (EMA by default) or a diffusers folder (pipeline or ``unet/``). Returns ``(unet_state_dict, info)``; ``info`` says where
    the weights came from (kind, used_ema, unet_params if known, window/global_step)."""
    source = str(path)
    p = Path(path)
    if p.is_dir():  # a diffusers pipeline folder or its unet/
        from refiner.formats.diffusers import load_diffusers_unet

        return load_diffusers_unet(p)
    if _is_safetensors(p):
        ww = _load_export(p)
        return ww.unet_state, _window_info("safetensors", ww)
    obj = safe_torch_load(p, trust_checkpoint)
    kind = describe_checkpoint(obj)
    if kind == "window":
        ww = _window_from_obj(obj, source, use_ema)
        return ww.unet_state, _window_info("window", ww)
    if kind == "compvis_ldm":
        ldm = _ldm_from_obj(obj, source, use_ema)
        return ldm.unet, dict(kind="compvis_ldm", source=source, used_ema=ldm.used_ema, unet_params=None,
                              global_step=ldm.global_step, scale_factor=ldm.scale_factor,
                              first_stage_fingerprint=first_stage_fingerprint(ldm.first_stage)
                              if ldm.first_stage else None)
    if kind == "first_stage":
        raise CheckpointError(f"{source} is a first-stage (VQ) checkpoint, not a denoiser; "
                              "use it as the first stage (load_first_stage), not as init_from")
    raise CheckpointError(f"{source} is {_kind_text(obj)}; init_from accepts a refiner window checkpoint, "
                          "an exported .safetensors or a CompVis LDM checkpoint")


def _window_info(kind: str, ww: WindowWeights) -> dict:
    return dict(kind=kind, source=ww.source, used_ema=ww.has_ema, unet_params=ww.unet_params,
                window=str(ww.window), global_step=ww.global_step, parameterization=ww.parameterization,
                scale_factor=ww.scale_factor, first_stage_fingerprint=ww.first_stage_fingerprint)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refiner.checkpoints", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="window .ckpt -> .safetensors (EMA weights by default)")
    ex.add_argument("ckpt")
    ex.add_argument("out")
    ex.add_argument("--raw", action="store_true", help="export the raw (non-EMA) weights")
    ex.add_argument("--force", action="store_true", help="replace an existing output file (never the input)")
    ex.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling (trusted files only)")
    ins = sub.add_parser("inspect", help="say what kind of checkpoint a file is")
    ins.add_argument("path")
    ins.add_argument("--trust-checkpoint", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from refiner.cli import run_cli

    def body() -> None:
        if args.command == "export":
            print(export_safetensors(args.ckpt, args.out, use_ema=not args.raw, trust_checkpoint=args.trust_checkpoint,
                                     force=args.force))
            return
        p = Path(args.path)
        if _is_safetensors(p):
            ww = _load_export(p)
            print(f"{p}: refiner-window export, window {ww.window}, {len(ww.unet_state)} tensors")
        else:
            obj = safe_torch_load(p, args.trust_checkpoint)
            sd = _state_dict_of(obj) or {}
            print(f"{p}: {_kind_text(obj)}; {len(sd)} tensors; {_prefix_summary(sd, depth=1)}")

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())

"""Exports, all in one place, each with its model card: one window expert as our ``.safetensors`` file (a LoRA window
merged), a LoRA window's adapters as a peft adapter folder, and a chain of window experts as one diffusers folder.
CLI: ``refiner export safetensors|peft|diffusers`` (:mod:`refiner.apps.export`).

:func:`export_diffusers` writes::

    OUT/unet/, unet_2/, ...   one UNet2DModel per expert, highest-noise window first (like WanPipeline's
                              transformer / transformer_2): config.json + diffusion_pytorch_model.safetensors
    OUT/vqvae/                VQModel (the f4 first stage), scaling_factor = the windows' scale factor
    OUT/scheduler/            DDIMScheduler with the windows' schedule (scheduler_config.json)
    OUT/refiner_chain.json    each expert's subfolder and window [t_min, t_max), its boundary_ratio t_min/T
    OUT/model_index.json      only for one full-range window [0, T): a standard ``LDMPipeline`` folder
    OUT/README.md             model card (refiner.formats.model_card)

:class:`refiner.inference.diffusers_pipeline.WindowChainPipeline` runs that folder with diffusers components only.

What marks a folder export of ours, so that ``--force`` may replace it (:func:`refiner.io.write_export_folder`): its
manifest and nothing but the entries the export writes. Diffusers: :data:`DIFFUSERS_LAYOUT`, manifest
``refiner_chain.json``. peft: :data:`PEFT_LAYOUT`, manifest ``adapter_config.json`` beside
``adapter_model.safetensors`` and ``README.md``. Any other existing folder is refused, naming a file it holds.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from refiner.formats.diffusers import DIFFUSERS_VERSION, DiffusersFormatError
from refiner.formats.diffusers.config import (
    scheduler_config,
    unet2d_config,
    unet_to_diffusers,
    vq_config,
    vq_to_diffusers,
)
from refiner.formats.diffusers.folders import CHAIN_FILE, CHAIN_FORMAT, WEIGHTS_NAME, write_json, write_model
from refiner.formats.fingerprint import warn_architecture_unknown
from refiner.formats.first_stage import build_first_stage
from refiner.formats.loading import load_window_weights, window_from_checkpoint
from refiner.formats.lora import BASE_KEY, LORA_KEY, lora_settings
from refiner.formats.model_card import (
    card_entry,
    checkpoint_extra,
    export_card_path,
    export_metadata,
    is_model_card,
    write_model_card,
)
from refiner.formats.safe_load import CheckpointError, is_safetensors, safe_torch_load
from refiner.formats.window_files import (
    WINDOW_UNET_PREFIX,
    WindowSetError,
    WindowWeights,
    check_window_set,
    is_window_export,
    window_metadata,
)
from refiner.io import ExportLayout, atomic_save, check_export_folder, check_output_path, write_export_folder
from refiner.models.lora import ADAPTER_NAME, adapter_state
from refiner.models.vq import VQModel, architecture_differences

log = logging.getLogger(__name__)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PEFT_WHAT = "peft adapter export of refiner"
PEFT_LAYOUT = ExportLayout(marker=PEFT_CONFIG, patterns=tuple(map(re.escape, (PEFT_CONFIG, PEFT_WEIGHTS, "README.md"))))
_MODEL = r"(unet(_[0-9]+)?|vqvae)"
DIFFUSERS_WHAT = "diffusers export of refiner"
DIFFUSERS_LAYOUT = ExportLayout(marker=CHAIN_FILE, patterns=(
    re.escape(CHAIN_FILE), r"model_index\.json", r"README\.md", "scheduler", r"scheduler/scheduler_config\.json",
    _MODEL, rf"{_MODEL}/(config\.json|{re.escape(WEIGHTS_NAME)})"))


def export_safetensors(ckpt_path: str | os.PathLike, out_path: str | os.PathLike, use_ema: bool = True,
                       trust_checkpoint: bool = False, force: bool = False) -> Path:
    """Write a window expert's UNet weights (EMA by default) to one ``.safetensors`` file, atomically, and its
    model card beside it (:func:`refiner.formats.model_card.export_card_path`: ``w.safetensors`` ->
    ``w.README.md``; window, schedule, parameterization, first-stage fingerprint, training data, steps, validation).

    Neither output may be ``ckpt_path`` (compared by inode: any spelling, symlink or hard link), and neither may
    exist unless ``force`` (:func:`refiner.io.check_output_path`); ``force`` replaces only a previous export of ours
    (:func:`refiner.formats.window_files.is_window_export`, :func:`refiner.formats.model_card.is_model_card`), and a
    symlinked ``out_path`` is resolved (the export it points to is replaced, its card beside it, the link kept). All
    of this is checked before reading. Returns ``out_path`` as given.

    Metadata (all strings): :func:`refiner.formats.window_files.window_metadata` (window, schedule, UNet params,
    scale factor, first-stage fingerprint and architecture, ...) and the card's validation_metrics (JSON) and
    data_description (:func:`refiner.formats.model_card.export_metadata`).
    """
    from safetensors.torch import save_file

    given = Path(out_path)
    out_path = check_output_path(given, inputs=[ckpt_path], force=force, what="export output", ours=is_window_export,
                                 kind="refiner window export")
    card_path = check_output_path(export_card_path(out_path), inputs=[ckpt_path], force=force, what="model card",
                                  ours=is_model_card, kind="refiner model card")
    obj = safe_torch_load(ckpt_path, trust_checkpoint)
    ww = window_from_checkpoint(obj, str(ckpt_path), use_ema, trust_checkpoint)
    entry = card_entry(ckpt_path, ww, checkpoint_extra(obj), name=out_path.name)
    tensors = {k: v.detach().contiguous().clone() for k, v in ww.unet_state.items()}
    metadata = {**window_metadata(ww), **export_metadata(entry)}
    atomic_save(out_path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    usage = "\n".join(["```python", "from refiner.formats.loading import load_window_weights", "",
                       f"unet = load_window_weights({out_path.name!r}).build_unet()  # t in {ww.window}", "```", "",
                       f"As an expert of a chain: `refiner refine experts=[...,{out_path.name}]`."])
    write_model_card(card_path, [entry], title=f"refiner window expert {ww.window}", usage=usage,
                     library_name="refiner")
    log.info("exported %s (%s weights, window %s) to %s%s, model card %s", ckpt_path, "EMA" if ww.has_ema else "raw",
             ww.window, given, f" (-> {out_path})" if out_path != given else "", card_path)
    return given


def export_peft_adapter(ckpt_path: str | os.PathLike, out: str | os.PathLike, use_ema: bool = True,
                        trust_checkpoint: bool = False, force: bool = False) -> Path:
    """Write the adapters of a LoRA window checkpoint as a peft adapter folder: ``adapter_config.json`` (a
    ``LoraConfig`` whose ``base_model_name_or_path`` is the base's path), ``adapter_model.safetensors`` (keys
    ``base_model.model.<layer>.lora_{A,B}.weight``, as ``PeftModel.save_pretrained`` writes them) and a
    ``README.md`` model card. ``PeftModel.from_pretrained(UNetModel(...) with the base weights, out)`` loads it.

    Written beside ``out`` and renamed into place (:func:`refiner.io.write_export_folder`); an existing ``out`` is
    refused unless ``force``, and even then unless it is a previous peft export (:data:`PEFT_LAYOUT`)."""
    from safetensors.torch import save_file

    out, ckpt_path = Path(out), Path(ckpt_path)
    check_export_folder(out, PEFT_LAYOUT, [ckpt_path], force, PEFT_WHAT)  # before anything is read
    obj = safe_torch_load(ckpt_path, trust_checkpoint)
    hp = obj.get("hyper_parameters") if isinstance(obj, Mapping) else None
    settings = lora_settings(hp) if isinstance(hp, Mapping) else None
    if settings is None:
        raise CheckpointError(f"{ckpt_path} is not a LoRA window checkpoint (no hyper_parameters['{LORA_KEY}'] with "
                              "rank > 0); export a full window with `refiner export safetensors` or "
                              "`refiner export diffusers`")
    weights = window_from_checkpoint(obj, str(ckpt_path), use_ema, trust_checkpoint)  # also checks the base
    states = obj.get("state_dict") if use_ema or "current_model_state" not in obj else obj["current_model_state"]
    tensors = {PEFT_PREFIX + k[len(WINDOW_UNET_PREFIX):].replace(f".{ADAPTER_NAME}.", "."): v.detach().contiguous()
               for k, v in adapter_state(states).items()}
    base = hp[BASE_KEY]
    usage = "\n".join([
        "```python", "from peft import PeftModel", "from refiner.formats.loading import load_init_weights",
        "from refiner.models.unet import UNetModel", "",
        f"state, _ = load_init_weights({base['path']!r}, use_ema={bool(base.get('use_ema', True))})  # the base",
        f"base = UNetModel(**{dict(hp['unet'])!r})", "base.load_state_dict(state)",
        f'unet = PeftModel.from_pretrained(base, "{out.name}")', "```",
        "", f"Base weights fingerprint (refiner.formats.fingerprint.weights_fingerprint): `{base['fingerprint']}`."])

    def write(folder: Path) -> None:
        settings.peft_config(base=base["path"]).save_pretrained(str(folder))  # writes adapter_config.json
        save_file(tensors, str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})
        write_model_card(folder / "README.md", [card_entry(ckpt_path, weights, checkpoint_extra(obj))],
                         title=f"refiner LoRA adapters (rank {settings.rank}) for window {weights.window}", usage=usage)

    write_export_folder(out, PEFT_LAYOUT, write, inputs=[ckpt_path], force=force, what=PEFT_WHAT)
    log.info("wrote the peft adapter folder %s (%d tensors, rank %d)", out, len(tensors), settings.rank)
    return out


# ------------------------------------------------------------------------------------------ diffusers folder
@dataclass
class WindowToExport:
    """One window to export: its weights, where they came from, and its subfolder."""

    weights: WindowWeights
    path: Path
    subfolder: str = "unet"
    extra: dict = field(default_factory=dict)  # hyper_parameters / metadata (first stage, fingerprint, ...)


def read_source_metadata(path: Path, trust_checkpoint: bool = False) -> dict:
    """The hyper_parameters (plus ``callbacks``/``global_step``) of a window ``.ckpt``, or the metadata of an
    exported ``.safetensors``, as a plain dict (for the first stage and the model card)."""
    if is_safetensors(path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    return checkpoint_extra(safe_torch_load(path, trust_checkpoint))


def _check_windows(windows: Sequence[WindowToExport]) -> None:
    for w in windows:
        if w.weights.conditioning == "concat":
            raise DiffusersFormatError(
                f"{w.path}: concat-conditioned window (in_channels={w.weights.unet_params['in_channels']}); "
                "diffusers has no pipeline that feeds a degraded latent next to the noisy one, so it is not exported")
    try:  # schedule, scale factor, first stage and window overlap: the checks every chain gets
        check_window_set([w.weights for w in windows])
    except WindowSetError as err:
        raise DiffusersFormatError(str(err)) from err
    params = {w.weights.parameterization for w in windows}
    if len(params) > 1:
        raise DiffusersFormatError(f"experts mix parameterizations {sorted(params)}; one DDIMScheduler has one "
                                   "prediction_type")


def _first_stage(windows: Sequence[WindowToExport], ckpt: str | None, params: Mapping | None,
                 trust_checkpoint: bool) -> tuple[VQModel, Path]:
    """The f4 to export (``ckpt``/``params``, else what the windows record), checked against the architecture every
    window recorded."""
    recorded = next((w.extra.get("first_stage") for w in windows if isinstance(w.extra.get("first_stage"), Mapping)),
                    None) or {}
    ckpt = ckpt or recorded.get("ckpt_path")
    params = params or recorded.get("params")
    if not ckpt:
        raise DiffusersFormatError("no first stage: the windows do not record first_stage.ckpt_path/params; pass "
                                   "--first-stage <vq-f4 checkpoint or diffusers vqvae folder> (and "
                                   "--first-stage-params <yaml/json> if that file records no params)")
    if not Path(ckpt).exists():
        raise DiffusersFormatError(f"first stage not found: {ckpt} (relative paths are relative to {os.getcwd()})")
    vq = build_first_stage(ckpt, params, trust_checkpoint=trust_checkpoint).eval()
    for w in windows:  # the fingerprint cannot see e.g. norm groups (refiner.formats.fingerprint)
        if not w.weights.first_stage_params:
            warn_architecture_unknown(str(w.path), str(ckpt))
            continue
        diffs = architecture_differences(w.weights.first_stage_params, vq.config)
        if diffs:
            raise DiffusersFormatError(f"{w.path} was trained with another first-stage architecture than {ckpt} "
                                       f"({'; '.join(diffs)}; the window's vs the first stage's): the exported folder "
                                       "would decode wrongly; give --first-stage the f4 the windows were trained with")
    return vq, Path(ckpt)


def export_diffusers(chain: Sequence[str | os.PathLike], out: str | os.PathLike, *, first_stage: str | None = None,
                     first_stage_params: Mapping | None = None, use_ema: bool = True, trust_checkpoint: bool = False,
                     force: bool = False) -> Path:
    """Write the window experts ``chain`` (our ``.ckpt`` / ``.safetensors``) as a diffusers folder ``out``.

    Written to a fresh folder beside ``out`` and renamed into place; an existing ``out`` is refused unless ``force``,
    and even then unless it is a previous export of ours (:data:`DIFFUSERS_LAYOUT`) that contains no input. A symlink
    ``out`` is resolved: the export it points to is replaced and the link kept. See the module docstring for the
    layout.
    """
    if not chain:
        raise DiffusersFormatError("give at least one window checkpoint to export")
    paths = [Path(p) for p in chain]
    inputs = paths + ([Path(first_stage)] if first_stage else [])
    check_export_folder(out, DIFFUSERS_LAYOUT, inputs, force, DIFFUSERS_WHAT)  # before anything is read
    windows = [WindowToExport(load_window_weights(p, use_ema=use_ema, trust_checkpoint=trust_checkpoint), p,
                              extra=read_source_metadata(p, trust_checkpoint)) for p in paths]
    _check_windows(windows)
    windows.sort(key=lambda w: -w.weights.window.t_max)  # highest noise first: unet, unet_2, ...
    for i, w in enumerate(windows):
        w.subfolder = "unet" if i == 0 else f"unet_{i + 1}"
    vq, vq_path = _first_stage(windows, first_stage, first_stage_params, trust_checkpoint)
    first = windows[0].weights
    if vq.embed_dim != first.unet_params["out_channels"]:
        raise DiffusersFormatError(f"first stage {vq_path} has {vq.embed_dim} latent channels but the UNets "
                                   f"predict {first.unet_params['out_channels']}")
    T = first.schedule.num_timesteps
    components = {w.subfolder: (unet2d_config(w.weights.unet_params),
                                unet_to_diffusers(w.weights.unet_state, w.weights.unet_params, str(w.path)))
                  for w in windows}
    components["vqvae"] = (vq_config(vq.config, first.scale_factor), vq_to_diffusers(vq.state_dict(), vq.config,
                                                                                     str(vq_path)))
    full_range = len(windows) == 1 and first.window.t_min == 0 and first.window.t_max == T
    chain_doc = {
        "format": CHAIN_FORMAT, "format_version": 1, "num_train_timesteps": T, "scale_factor": first.scale_factor,
        "parameterization": first.parameterization, "vqvae": "vqvae", "scheduler": "scheduler",
        "experts": [dict(subfolder=w.subfolder, t_min=w.weights.window.t_min, t_max=w.weights.window.t_max,
                         boundary_ratio=w.weights.window.t_min / T, source=str(w.path),
                         global_step=w.weights.global_step, ema=w.weights.has_ema) for w in windows],
        "usage": "expert k denoises t with t_min <= t < t_max (t=0 clean); see refiner.inference.diffusers_pipeline."
                 "WindowChainPipeline",
    }

    def write(folder: Path) -> None:
        for name, (config, state) in components.items():
            write_model(folder / name, config, state)
        (folder / "scheduler").mkdir()
        write_json(folder / "scheduler" / "scheduler_config.json",
                   scheduler_config(first.schedule, first.parameterization))
        write_json(folder / CHAIN_FILE, chain_doc)
        if full_range:
            write_json(folder / "model_index.json", {
                "_class_name": "LDMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DModel"],
                "vqvae": ["diffusers", "VQModel"]})
        write_model_card(folder / "README.md",
                         [card_entry(w.path, w.weights, w.extra, w.subfolder) for w in windows],
                         title=f"refiner window chain {' + '.join(str(w.weights.window) for w in windows)}",
                         usage=_usage_text(Path(out), full_range), first_stage=str(vq_path))

    write_export_folder(out, DIFFUSERS_LAYOUT, write, inputs=paths + [vq_path], force=force,
                        what=DIFFUSERS_WHAT)
    log.info("exported %d expert(s) to %s%s", len(windows), out, " (LDMPipeline)" if full_range else "")
    return Path(out)


def _usage_text(out: Path, full_range: bool) -> str:
    lines = ["```python", "from refiner.inference.diffusers_pipeline import WindowChainPipeline",
             f'pipe = WindowChainPipeline.from_pretrained("{out.name}")',
             "refined = pipe(images, t_start=481, num_inference_steps=50)  # images: (B, 3, H, W) in [-1, 1]", "```"]
    if full_range:
        lines += ["", "A full-range model is also a standard diffusers `LDMPipeline`:", "", "```python",
                  "from diffusers import LDMPipeline", f'images = LDMPipeline.from_pretrained("{out.name}")().images',
                  "```"]
    return "\n".join(lines)

"""Model cards (``README.md``) for exported window experts.

One card describes one or more experts: window, schedule, parameterization, scale factor, first-stage
fingerprint, training data, steps and validation metrics. Values come from the checkpoint's
``hyper_parameters`` (or an exported ``.safetensors``' metadata), its Lightning ``callbacks`` state
(``ModelCheckpoint``'s ``best_model_score`` and ``monitor``) and, for training data, the run's
``config_resolved.yaml`` next to the checkpoint. Anything not recorded is written as "unknown" /
"not recorded" rather than guessed.

Every exporter writes one: the diffusers and peft exports a ``README.md`` in their folder, the ``.safetensors``
export a card beside its file (:func:`export_card_path`: ``<name>.safetensors`` -> ``<name>.README.md``). The
``.safetensors`` metadata also carries the card's validation metrics and training-data description
(:func:`export_metadata`), so a card written later from the exported file (e.g. by the diffusers export) keeps them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from refiner.io import atomic_write_text

FINGERPRINT_KEY = "first_stage_fingerprint"
UNKNOWN = "unknown"
CARD_TAG = "- refiner"  # the first tag of every card's front matter: what marks a card as ours


@dataclass
class CardEntry:
    """What the card says about one expert."""

    name: str
    source: str
    window: str
    schedule: str
    parameterization: str
    scale_factor: float
    first_stage_fingerprint: str = UNKNOWN
    training_data: str = "not recorded"
    global_step: int | None = None
    ema: bool | None = None
    validation: dict[str, float] = field(default_factory=dict)
    lora: str | None = None  # "LoRA rank r (alpha a) on <base> (weights fingerprint f)" for an adapter window


def checkpoint_extra(obj: Mapping[str, Any]) -> dict:
    """What a card reads from a loaded window ``.ckpt``: its ``hyper_parameters`` plus the Lightning ``callbacks``
    state (where ``ModelCheckpoint`` keeps ``best_model_score``)."""
    return {**dict(obj.get("hyper_parameters") or {}), "callbacks": obj.get("callbacks") or {}}


def export_card_path(out: str | os.PathLike) -> Path:
    """The card beside a single-file export: ``w.safetensors`` -> ``w.README.md`` (``w`` -> ``w.README.md``)."""
    out = Path(out)
    return out.with_name((out.stem if out.suffix == ".safetensors" else out.name) + ".README.md")


def export_metadata(entry: "CardEntry") -> dict[str, str]:
    """Card fields a ``.safetensors`` export records as metadata strings (read back by :func:`validation_metrics`
    and :func:`training_data`): ``validation_metrics`` (JSON) and ``data_description`` ("" when not recorded)."""
    described = entry.training_data if entry.training_data != "not recorded" else ""
    return {"validation_metrics": json.dumps(entry.validation, sort_keys=True), "data_description": described}


def _describe_schedule(schedule) -> str:
    if schedule.kind == "cosine":
        return f"cosine (s={schedule.cosine_s}), T={schedule.num_timesteps}"
    what = "linear in sqrt(beta) (CompVis 'linear')" if schedule.kind == "linear" else "linear in beta"
    return f"{what}, beta {schedule.linear_start} -> {schedule.linear_end}, T={schedule.num_timesteps}"


def validation_metrics(extra: Mapping[str, Any]) -> dict[str, float]:
    """Best scores recorded by ``ModelCheckpoint`` callbacks (``{monitor: best_model_score}``), or the JSON
    of a ``validation_metrics`` metadata entry."""
    out: dict[str, float] = {}
    recorded = extra.get("validation_metrics")
    if isinstance(recorded, str):
        try:
            recorded = json.loads(recorded)
        except json.JSONDecodeError:
            recorded = None
    if isinstance(recorded, Mapping):
        out.update({str(k): float(v) for k, v in recorded.items() if _is_number(v)})
    callbacks = extra.get("callbacks")
    for state in (callbacks.values() if isinstance(callbacks, Mapping) else []):
        if isinstance(state, Mapping) and state.get("monitor") and _is_number(state.get("best_model_score")):
            out[f"best {state['monitor']}"] = float(state["best_model_score"])
    return out


def _is_number(v: Any) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def training_data(path: Path, extra: Mapping[str, Any]) -> str:
    """``data_description`` if the checkpoint records one, else the ``data`` block of the run's
    ``config_resolved.yaml`` (``<run>/config_resolved.yaml`` beside ``<run>/checkpoints/``)."""
    if extra.get("data_description"):
        return str(extra["data_description"])
    for cfg in (path.parent / "config_resolved.yaml", path.parent.parent / "config_resolved.yaml"):
        if cfg.is_file():
            import yaml

            try:
                data = (yaml.safe_load(cfg.read_text()) or {}).get("data") or {}
            except yaml.YAMLError:
                continue
            keys = ("description", "train_shards", "val_shards", "mode", "batch_size")
            parts = [f"{k}={data[k]}" for k in keys if data.get(k) not in (None, "")]
            if parts:
                return f"{', '.join(parts)} (from {cfg.name})"
    return "not recorded"


def card_entry(path: str | os.PathLike, weights, extra: Mapping[str, Any], name: str | None = None) -> CardEntry:
    """A :class:`CardEntry` from a loaded ``WindowWeights`` and the source's hyper_parameters / metadata."""
    path = Path(path)
    return CardEntry(
        name=name or path.name, source=str(path), window=str(weights.window),
        schedule=_describe_schedule(weights.schedule), parameterization=weights.parameterization,
        scale_factor=float(weights.scale_factor),
        first_stage_fingerprint=str(extra.get(FINGERPRINT_KEY) or UNKNOWN),
        training_data=training_data(path, extra), global_step=weights.global_step, ema=weights.has_ema,
        validation=validation_metrics(extra), lora=_lora_text(extra),
    )


def _lora_text(extra: Mapping[str, Any]) -> str | None:
    lora, base = extra.get("lora"), extra.get("lora_base")
    if not isinstance(lora, Mapping) or not lora.get("rank") or not isinstance(base, Mapping):
        return None
    return (f"LoRA rank {lora['rank']} (alpha {lora.get('alpha')}, targets {', '.join(lora.get('targets') or [])}) "
            f"on `{base.get('path')}` (weights fingerprint {base.get('fingerprint')})")


def is_model_card(path: str | os.PathLike) -> bool:
    """True if ``path`` is a model card refiner wrote (:func:`render_model_card`'s front matter: ``library_name``,
    then the tag ``refiner``), so that ``--force`` may replace it; any other file is someone's own."""
    try:
        with open(path, encoding="utf-8") as f:
            head = [f.readline().rstrip("\n") for _ in range(4)]
    except (OSError, UnicodeDecodeError):
        return False
    return head[0] == "---" and head[1].startswith("library_name: ") and head[2:] == ["tags:", CARD_TAG]


def render_model_card(entries: Sequence[CardEntry], title: str, usage: str = "",
                      first_stage: str | None = None, library_name: str = "diffusers") -> str:
    lines = ["---", f"library_name: {library_name}", "tags:", CARD_TAG, "- latent-diffusion", "- timestep-window-expert",
             "---", "", f"# {title}", "",
             "Late-timestep window experts trained with refiner. Timesteps: t=0 is clean, t=T-1 is pure noise; "
             "a window [t_min, t_max) is half-open and the expert was trained only on those t.", ""]
    if first_stage:
        lines += [f"First stage (VQ-f4) exported from `{first_stage}`.", ""]
    for e in entries:
        metrics = ", ".join(f"{k} = {v:.6g}" for k, v in sorted(e.validation.items())) or "not recorded"
        lines += [
            f"## {e.name}", "",
            "| field | value |", "|---|---|",
            f"| window | t in {e.window} |",
            f"| schedule | {e.schedule} |",
            f"| parameterization | {e.parameterization} |",
            f"| scale factor | {e.scale_factor:.6g} |",
            f"| first-stage fingerprint | {e.first_stage_fingerprint} |",
            f"| training data | {e.training_data} |",
            f"| steps | {UNKNOWN if e.global_step is None else e.global_step} |",
            f"| weights | {'EMA' if e.ema else 'raw'} |",
            *([f"| adapters | {e.lora} |"] if e.lora else []),
            f"| validation | {metrics} |",
            f"| source | `{e.source}` |", "",
        ]
    if usage:
        lines += ["## Usage", "", usage, ""]
    return "\n".join(lines)


def write_model_card(path: str | os.PathLike, entries: Sequence[CardEntry], title: str, usage: str = "",
                     first_stage: str | None = None, library_name: str = "diffusers") -> Path:
    """Render and write the card atomically (:func:`refiner.io.atomic_write_text`); returns ``path``."""
    path = Path(path)
    atomic_write_text(path, render_model_card(entries, title, usage, first_stage, library_name))
    return path

"""First stages (VQ autoencoders) from any file refiner reads, dispatched by what the path is: a folder is a diffusers
``VQModel`` (:mod:`refiner.formats.diffusers.folders`), a file a CompVis/taming/our checkpoint
(:mod:`refiner.formats.compvis`).

* :class:`FirstStageSpec`: which first stage, ``{ckpt_path, params}`` as a typed, checked value (an app builds it
  from its ``first_stage.<name>`` config block; the library never sees that config);
* :func:`load_first_stage_model` (a spec) and :func:`first_stage_from_mapping` (a plain ``{ckpt_path, params}``
  mapping): the trained ``VQModel`` in eval mode;
* :func:`build_first_stage`: ``VQModel(**params)`` loaded strictly from a file or folder (random init without one);
* :func:`load_first_stage` / :func:`first_stage_file_fingerprint`: the weights alone, and their fingerprint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from refiner.formats.compvis import VQ_REQUIRED_ARGS, read_first_stage_checkpoint, vq_params
from refiner.formats.diffusers.folders import load_diffusers_vq
from refiner.formats.fingerprint import first_stage_fingerprint
from refiner.formats.kinds import load_strict
from refiner.formats.safe_load import CheckpointError
from refiner.models.vq import VQModel, architecture_differences
from refiner.settings import to_plain


@dataclass(frozen=True)
class FirstStageSpec:
    """Which first stage to load.

    ``ckpt_path``: its checkpoint (CompVis vq-f4/vq-f8, taming, one of our first-stage runs, an LDM checkpoint's
    ``first_stage_model``) or a diffusers ``VQModel`` folder; required, since a randomly initialised autoencoder
    would silently produce noise. ``params``: ``{ddconfig, n_embed, embed_dim}`` (a CompVis
    ``first_stage_config.params``; training-only entries such as ``lossconfig`` are ignored, a ``{target, params}``
    block is unwrapped); may be None when the file records its own architecture (a diffusers folder's config.json,
    our first-stage checkpoints). ``name``: ``f4`` or ``f8``, for messages (``first_stage.<name>.ckpt_path``)."""

    ckpt_path: str | None
    params: dict | None = None
    name: str = "f4"

    def __post_init__(self) -> None:
        if self.ckpt_path in (None, "") or not isinstance(self.ckpt_path, (str, os.PathLike)):
            raise CheckpointError(f"first_stage.{self.name}.ckpt_path is not set: point it at a VQ-{self.name} "
                                  f"checkpoint (e.g. first_stage=compvis paths.vq_{self.name}=/path/to/"
                                  f"vq-{self.name}/model.ckpt)")
        object.__setattr__(self, "ckpt_path", str(self.ckpt_path))
        if self.params is None:
            return
        params = self.params
        if isinstance(params, Mapping) and "ddconfig" not in params and isinstance(params.get("params"), Mapping):
            params = params["params"]
        if not isinstance(params, Mapping) or not all(k in params for k in VQ_REQUIRED_ARGS):
            raise CheckpointError(f"first_stage.{self.name}.params must be a mapping with {', '.join(VQ_REQUIRED_ARGS)}"
                                  f", got {self.params!r}")
        object.__setattr__(self, "params", to_plain(params))

    @classmethod
    def from_mapping(cls, block: Mapping[str, Any] | None, name: str = "f4") -> "FirstStageSpec":
        """A spec from a ``{ckpt_path, params}`` mapping (unknown keys are refused)."""
        if isinstance(block, FirstStageSpec):
            return block
        if block is None:
            block = {}
        if not isinstance(block, Mapping):
            raise CheckpointError(f"first_stage.{name} must be a mapping {{ckpt_path, params}}, got {block!r}")
        unknown = sorted(set(block) - {"ckpt_path", "params"})
        if unknown:
            raise CheckpointError(f"first_stage.{name}: unknown keys {unknown}; expected ckpt_path, params")
        return cls(block.get("ckpt_path"), block.get("params"), name)


def load_first_stage(ckpt_path: str | os.PathLike, trust_checkpoint: bool = False) -> dict[str, Tensor]:
    """First-stage weights in our (taming) layout from any file :func:`build_first_stage` reads (a diffusers
    folder's converted), without training-only ``loss.*`` keys."""
    if Path(ckpt_path).is_dir():
        return load_diffusers_vq(ckpt_path).state_dict()
    return read_first_stage_checkpoint(ckpt_path, trust_checkpoint)[0]


def first_stage_file_fingerprint(ckpt_path: str | os.PathLike, trust_checkpoint: bool = False) -> str:
    """:func:`refiner.formats.fingerprint.first_stage_fingerprint` of a first-stage file or folder (any layout
    :func:`load_first_stage` reads; its ``loss.*`` keys do not count)."""
    return first_stage_fingerprint(load_first_stage(ckpt_path, trust_checkpoint))


def build_first_stage(ckpt_path: str | os.PathLike | None = None, config: Mapping | None = None,
                      trust_checkpoint: bool = False) -> VQModel:
    """``VQModel(**config)`` loaded strictly from ``ckpt_path`` (random init if no path).

    ``config`` is a CompVis ``first_stage_config.params`` (ddconfig, n_embed, embed_dim; training-only entries such
    as ``lossconfig`` are ignored) or a ``{target, params}`` block around it. A folder ``ckpt_path`` is read as a
    diffusers ``VQModel`` (its config.json decides the architecture; ``config`` differing only warns). A checkpoint
    of our own first-stage training records its params: without ``config`` they are used, and a ``config`` that
    describes another network is refused (:func:`refiner.models.vq.architecture_differences`).
    """
    if config is not None:
        config = dict(config)
        if "params" in config and "ddconfig" not in config:
            config = dict(config["params"])
    if ckpt_path is not None and Path(ckpt_path).is_dir():  # a diffusers VQModel folder (e.g. <pipeline>/vqvae)
        return load_diffusers_vq(ckpt_path, expected_params=config)
    if ckpt_path is None and config is None:
        raise CheckpointError("build_first_stage needs config (ddconfig, n_embed, embed_dim) or a checkpoint")
    state, saved = read_first_stage_checkpoint(ckpt_path, trust_checkpoint) if ckpt_path is not None else ({}, None)
    if config is None and saved is None:
        raise CheckpointError(f"first stage {ckpt_path} records no architecture; give its params (ddconfig, "
                              "n_embed, embed_dim)")
    params = vq_params(config if config is not None else saved, f"first-stage config for {ckpt_path}")
    diffs = architecture_differences(saved, params) if saved is not None else []
    if diffs:  # e.g. norm_groups: the weights load strictly either way, and the wrong network decodes garbage
        raise CheckpointError(f"{ckpt_path} was trained as a different first stage than the config describes "
                              f"(checkpoint vs config: {'; '.join(diffs)}); make first_stage.*.params match it")
    model = VQModel(**params)
    if ckpt_path is not None:
        load_strict(model, state, source=str(ckpt_path))
    return model


def load_first_stage_model(spec: FirstStageSpec, trust_checkpoint: bool = False,
                           device: str | torch.device = "cpu") -> VQModel:
    """The trained ``VQModel`` a :class:`FirstStageSpec` names, on ``device``, in eval mode."""
    return build_first_stage(spec.ckpt_path, spec.params, trust_checkpoint=trust_checkpoint).to(device).eval()


def first_stage_from_mapping(block: Mapping[str, Any] | FirstStageSpec | None, name: str = "f4",
                             trust_checkpoint: bool = False, device: str | torch.device = "cpu") -> VQModel:
    """:func:`load_first_stage_model` for a plain ``{ckpt_path, params}`` mapping (or a spec): what a
    ``first_stage.<name>`` config block holds once an app has resolved it to plain containers."""
    return load_first_stage_model(FirstStageSpec.from_mapping(block, name), trust_checkpoint, device)

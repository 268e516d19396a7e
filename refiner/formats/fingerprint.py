"""Which first stage (VQ-f4) a window expert was trained with: a short, stable digest of its weights.

A window denoises latents of one particular autoencoder; run with another one it turns images into
coloured noise. Every window checkpoint therefore records ``hyper_parameters["first_stage_fingerprint"]``
(a str, or None when training had no f4 checkpoint), every safetensors export carries it in its metadata
under the same key, and ``refine.py`` / ``init_from`` compare it with the first stage they are given.

:func:`first_stage_fingerprint` definition (version 1), so other tools can reproduce it:

* take the VQ weights as a state dict (a module's ``state_dict()``), without the training-only ``loss.*``
  keys (discriminator, LPIPS, logvar), so a taming/CompVis checkpoint and the bare weights agree;
* sha256 over the line ``refiner-first-stage-fingerprint/1``, then for every key in sorted order the line
  ``<key> <dtype> <shape>`` followed by the tensor's bytes, where floating tensors are first converted to
  float32 on CPU (dtype ``float32``) and other tensors keep their dtype (C-contiguous, native byte order);
* the first 16 hex characters of the digest.

The fingerprint covers the weights, not the network that reads them: a GroupNorm's weights do not depend on its group
count, so the same f4 weights built with 8 groups instead of 32 keep the fingerprint and decode wrongly. Beside it,
windows record their f4's architecture (``{ddconfig, n_embed, embed_dim}``: channels, ``ch_mult`` and so the factor,
``z_channels``, ``embed_dim``, norm groups, ...), and :func:`check_first_stage_architecture` compares it with the
first stage they are run with, whatever file that came from (CompVis/taming ``.ckpt`` with its config, our own,
a diffusers folder). The fingerprint's value is unchanged by this (existing checkpoints record it), and a window that
records no architecture (older files) is still run, with a warning, its weights checked by the fingerprint alone.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from refiner.errors import SettingError
from refiner.models.vq import architecture_differences

FINGERPRINT_KEY = "first_stage_fingerprint"
FINGERPRINT_VERSION = "refiner-first-stage-fingerprint/1"
TRAINING_ONLY_PREFIX = "loss."
HEX_CHARS = 16


class FirstStageMismatch(SettingError):
    """Window experts and a first stage (or two experts) that were not trained on the same autoencoder."""


def first_stage_fingerprint(state_dict_or_module: Mapping[str, Tensor] | nn.Module) -> str:
    """The 16-hex-character fingerprint of first-stage weights (see the module docstring for the recipe)."""
    return weights_fingerprint(state_dict_or_module, skip_prefixes=(TRAINING_ONLY_PREFIX,))


def weights_fingerprint(state_dict_or_module: Mapping[str, Tensor] | nn.Module, skip_prefixes: tuple[str, ...] = ()
                        ) -> str:
    """The recipe of :func:`first_stage_fingerprint` for any weights (e.g. a window's UNet), keeping every key
    that does not start with one of ``skip_prefixes``."""
    state = (state_dict_or_module.state_dict() if isinstance(state_dict_or_module, nn.Module)
             else state_dict_or_module)
    digest = hashlib.sha256(FINGERPRINT_VERSION.encode() + b"\n")
    for key in sorted(k for k in state if not (skip_prefixes and k.startswith(skip_prefixes))):
        t = state[key].detach().to("cpu")
        if t.is_floating_point():
            t = t.to(torch.float32)
        t = t.contiguous()
        digest.update(f"{key} {str(t.dtype).removeprefix('torch.')} {list(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:HEX_CHARS]


def _mismatch(message: str, allow_mismatch: bool) -> None:
    if not allow_mismatch:
        raise FirstStageMismatch(message + "; pass allow_first_stage_mismatch=true to run anyway")
    warnings.warn(message + " (allow_first_stage_mismatch=true: continuing)", stacklevel=3)


def check_first_stage_match(expected: str | None, expected_source: str, actual: str | None, actual_source: str,
                            allow_mismatch: bool = False) -> bool:
    """Check that ``expected_source`` (a window, an init_from checkpoint) was trained with the first stage
    ``actual_source`` whose fingerprint is ``actual``. Returns True if both are known and equal.

    A fingerprint that is unknown (an older checkpoint) only warns. A mismatch raises
    :class:`FirstStageMismatch` naming both, or warns with ``allow_mismatch``.
    """
    if expected is None or actual is None:
        missing = expected_source if expected is None else actual_source
        warnings.warn(f"{missing} records no first-stage fingerprint (an older checkpoint?); cannot check that "
                      f"{expected_source} was trained with {actual_source}", stacklevel=2)
        return False
    if expected != actual:
        _mismatch(f"first stage mismatch: {expected_source} was trained with first stage {expected}, but "
                  f"{actual_source} has fingerprint {actual}; its latents would decode to noise", allow_mismatch)
        return False
    return True


def check_fingerprints_agree(named: Iterable[tuple[str, str | None]], allow_mismatch: bool = False,
                             why: str = "windows of one chain must share one first stage") -> str | None:
    """The common fingerprint of ``(source, fingerprint)`` pairs (unknown ones are skipped), or None if none is
    known. Two different known fingerprints raise :class:`FirstStageMismatch` naming both and ``why`` (or warn
    with ``allow_mismatch``)."""
    known = [(source, fp) for source, fp in named if fp is not None]
    for source, fp in known[1:]:
        if fp != known[0][1]:
            _mismatch(f"first stage mismatch: {known[0][0]} has first stage {known[0][1]} but {source} has {fp}; "
                      f"{why}", allow_mismatch)
            break
    return known[0][1] if known else None


def check_first_stage_architecture(expected: Mapping | None, expected_source: str, actual: Mapping | None,
                                   actual_source: str, allow_mismatch: bool = False) -> bool:
    """Check that ``expected_source`` (a window) was trained with a first stage of the architecture ``actual``
    (``{ddconfig, n_embed, embed_dim}`` of ``actual_source``, e.g. ``VQModel.config``), the parameters that change
    how the same weights are read (:func:`refiner.models.vq.architecture_differences`). Returns True if both are
    known and equal. A window that records no architecture (one trained or exported before windows recorded it, or
    trained without ``model.first_stage``) is run, with a warning (:func:`warn_architecture_unknown`): refusing it
    would make every older window unusable, and its fingerprint is still checked. A difference raises
    :class:`FirstStageMismatch` naming both and every differing entry, or warns with ``allow_mismatch``."""
    if expected is None:
        if actual is not None:
            warn_architecture_unknown(expected_source, actual_source)
        return False
    if actual is None:
        return False
    diffs = architecture_differences(expected, actual)
    if diffs:
        _mismatch(f"first stage mismatch: {expected_source} was trained with another first-stage architecture than "
                  f"{actual_source} ({'; '.join(diffs)}; the window's vs the first stage's): the same weights read by "
                  "another network decode wrongly", allow_mismatch)
        return False
    return True


def warn_architecture_unknown(window_source: str, first_stage_source: str) -> None:
    """Say that ``window_source`` records no first-stage architecture, so that ``first_stage_source`` being the same
    network (norm groups, channels, factor, ...) cannot be checked; only its weights (the fingerprint) can."""
    warnings.warn(f"{window_source} records no first-stage architecture (an older checkpoint or export?); cannot "
                  f"check that {first_stage_source} reads its latents with the same network (norm groups, channels, "
                  "factor, ...), only that the weights match; re-export or retrain to record it", stacklevel=3)


def check_architectures_agree(named: Iterable[tuple[str, Mapping | None]], allow_mismatch: bool = False) -> dict | None:
    """The common first-stage architecture of ``(source, params)`` pairs (unknown ones are skipped), or None if none
    is known. Two that differ raise :class:`FirstStageMismatch` naming both (or warn with ``allow_mismatch``)."""
    known = [(source, params) for source, params in named if params is not None]
    for source, params in known[1:]:
        if not check_first_stage_architecture(params, source, known[0][1], known[0][0], allow_mismatch):
            break
    return dict(known[0][1]) if known else None

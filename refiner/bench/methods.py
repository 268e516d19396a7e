"""What the benchmark compares: diffusion refiners (SDEdit through any chain of window experts) and an
unsharp-mask "SR-like" baseline, each over a sweep of one strength setting.

A diffusion method is a list of window checkpoints and the t_start values to refine from. Every t_start
gets the same DDIM step density (:func:`steps_for`), so two methods at the same t_start spend the same
number of UNet evaluations: equal compute at inference. The methods of the default benchmark
(``conf/methods/full.yaml``; their settings: :class:`refiner.bench.settings.MethodSpec`):

* ``chain``: the shape window [250, 500) and the detail window [0, 250), the product;
* ``shape_window`` / ``detail_window``: one window alone, used outside its window with
  ``allow_outside_window`` (the nearest window takes the steps it does not cover);
* ``full_range``: SDEdit through the full-range model trained with the chain's total step budget;
* ``paired``: the paired img2img baseline (a full-range model conditioned on the input latent by concat),
  trained on (f8-degraded, clean) pairs for the same budget;
* ``unsharp``: PIL's unsharp mask at several amounts (no model at all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from refiner.bench.checks import BenchError
from refiner.bench.settings import MethodSpec
from refiner.data.checker import RULES, check_batch
from refiner.metrics import psnr, ssim, swd

__all__ = ["BenchError", "Method", "methods_from_settings", "score", "unsharp"]


@dataclass(frozen=True)
class Method:
    """One compared method. ``settings`` are t_start values (diffusion) or unsharp amounts in percent."""

    name: str
    kind: str
    settings: tuple[int, ...]
    experts: tuple[str, ...] = ()
    allow_outside_window: bool = False
    radius: float = 1.0
    label: str = ""

    @property
    def setting_name(self) -> str:
        return "t_start" if self.kind == "diffusion" else "amount_percent"

    @classmethod
    def from_spec(cls, name: str, spec: MethodSpec) -> "Method":
        """The method ``methods.<name>`` of the settings (checked there)."""
        label = name if spec.label is None else spec.label
        if spec.unsharp is not None:
            return cls(name, "unsharp", spec.unsharp.amounts, radius=float(spec.unsharp.radius), label=label)
        return cls(name, "diffusion", spec.t_starts, spec.experts, spec.allow_outside_window, label=label)


def methods_from_settings(methods: Mapping[str, MethodSpec]) -> list[Method]:
    """Every method of ``methods`` (name -> :class:`~refiner.bench.settings.MethodSpec`), in order."""
    return [Method.from_spec(name, spec) for name, spec in methods.items()]


def unsharp(images: Sequence[np.ndarray], amount_percent: int, radius: float = 1.0) -> list[np.ndarray]:
    """PIL's unsharp mask (threshold 0): out = in + amount * (in - gaussian_blur(in, radius))."""
    from PIL import Image, ImageFilter

    f = ImageFilter.UnsharpMask(radius=radius, percent=int(amount_percent), threshold=0)
    return [np.asarray(Image.fromarray(img).filter(f)) for img in images]


def _unit(images: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).double() / 255.0


def score(outputs: Sequence[np.ndarray], inputs: Sequence[np.ndarray], references: Sequence[np.ndarray],
          clean: Sequence[np.ndarray] | None = None, swd_kwargs: Mapping | None = None) -> dict:
    """The benchmark's numbers for one set of outputs.

    * ``artifact_rate``: fraction failing any rule of :func:`refiner.data.checker.check`, plus
      ``rule_failure_rate`` per rule;
    * ``swd_x1e3``: SWD (Laplacian-pyramid patches, :func:`refiner.metrics.swd`) to clean ``references`` (an
      independent set of clean heads): how much the outputs look like the family;
    * faithfulness to the input: ``rmse_to_input`` (pixels in [0, 1], mean over images of the per-image RMSE)
      and ``ssim_to_input``;
    * with ``clean``: ``psnr_to_clean`` (dB, mean over images).
    """

    results = check_batch(outputs)
    out, inp, ref = _unit(outputs), _unit(inputs), _unit(references)
    rmse = ((out - inp) ** 2).mean(dim=(1, 2, 3)).sqrt()
    values = {
        "artifact_rate": sum(not r.passed for r in results) / len(results),
        "rule_failure_rate": {rule: sum(not r.rules[rule] for r in results) / len(results) for rule in RULES},
        "swd_x1e3": swd(out, ref, **{"dtype": torch.float32, **dict(swd_kwargs or {})})["mean"],
        "rmse_to_input": float(rmse.mean()),
        "ssim_to_input": float(ssim(out, inp, dtype=torch.float32).mean()),
    }
    if clean is not None:
        p = psnr(out, _unit(clean))
        values["psnr_to_clean"] = float(p.clamp(max=100.0).mean())  # identical images give inf; cap at 100 dB
    values["failed"] = [i for i, r in enumerate(results) if not r.passed]
    return values

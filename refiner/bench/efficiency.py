"""The blog's efficiency claim over training seeds: how many steps a window needs to reach the equal-compute full-range
model's final in-window loss (issue 22, item 3).

For each training seed, from the runs' logged in-window validation losses (``val/loss_in_{t_min}_{t_max}``: plain
eps-MSE at t and noise fixed by seed 0, the same for every model and seed; :mod:`refiner.lit.window_module`):

* **shape window, t in [250, 500):** ``target`` = the full-range model's loss in that window at its last validation;
  ``steps`` = the first validation at which the shape window's loss is at or below ``target``;
  ``ratio = full_steps / steps``, the full-range model's training steps per window step to the same loss.
* **detail window, t in [0, 250):** the same with the detail window, counting the shape window's steps too (the
  detail window is finetuned from it): ``steps = shape_steps + detail steps``.

A ratio above 1 means the window got there in fewer steps. A run that never reaches ``target`` has no ratio (the
summary counts it). Steps are counted as training steps done: a validation logged at CSV ``step`` s ran after s + 1
steps. The resolution is the validation interval (``refiner bench-seeds val_every=50``).

:func:`summary` gives the geometric mean ratio over seeds with a 95% t interval on the log ratios (Student, n - 1
degrees of freedom). One level only: the validation batches are fixed, so the spread is between trained models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import stats

from refiner.bench.report import first_step_at_or_below, read_logged

# (name, metric, window run, runs trained before it in the chain)
COMPARISONS = (("shape window, t in [250, 500)", "val/loss_in_250_500", "refiner_500_750", ()),
               ("detail window, t in [0, 250)", "val/loss_in_0_250", "refiner_751_1000", ("refiner_500_750",)))
FULL_RANGE = "full_range"


@dataclass(frozen=True)
class Reach:
    """One seed, one window: the full-range model's final loss ``target`` after ``full_steps`` steps, the window's
    ``steps`` to reach it (None: not within its budget), the validation interval seen and the window's own
    ``final`` loss (after all its steps, and its chain's)."""

    target: float
    full_steps: int
    steps: int | None
    interval: int
    final: float = math.nan

    @property
    def ratio(self) -> float | None:
        return None if self.steps is None else self.full_steps / self.steps

    @property
    def loss_ratio(self) -> float:
        """The window's final in-window loss over the full-range model's: below 1, the window ends lower."""
        return self.final / self.target


def _done(steps: Sequence[int]) -> list[int]:
    return [s + 1 for s in steps]


def reach(seed_dir: str | Path, metric: str, window: str, before: Sequence[str] = ()) -> Reach | None:
    """:class:`Reach` of one seed's ``window`` run against its full-range run (both under ``seed_dir``); None when
    either did not log ``metric``."""
    seed_dir = Path(seed_dir)
    full_steps, full_losses = read_logged(seed_dir / FULL_RANGE, metric)
    steps, losses = read_logged(seed_dir / window, metric)
    if not full_steps or not steps:
        return None
    offset = 0
    for run in before:  # the runs this one was finetuned from: their budgets count
        earlier, _ = read_logged(seed_dir / run, metric)
        if not earlier:
            return None
        offset += _done(earlier)[-1]
    done = _done(steps)
    first = first_step_at_or_below(done, losses, full_losses[-1])
    interval = min(np.diff(done)) if len(done) > 1 else done[0]
    return Reach(target=full_losses[-1], full_steps=_done(full_steps)[-1],
                 steps=None if first is None else offset + first, interval=int(interval), final=losses[-1])


@dataclass(frozen=True)
class RatioSummary:
    """Geometric mean of the step ratios of the seeds that reached the target, with its 95% t interval only when every
    seed did (a seed that did not reach it has a ratio below ``full_steps / budget``, which a mean over the others
    would overstate), how many reached it, and the final-loss ratio (:attr:`Reach.loss_ratio`, defined for every
    seed) as geometric mean with its interval."""

    geometric_mean: float | None
    low: float | None
    high: float | None
    reached: int
    seeds: int
    loss_ratio: tuple[float | None, float | None, float | None] = (None, None, None)


def _geometric(values: Sequence[float], level: float) -> tuple[float | None, float | None, float | None]:
    """Geometric mean and its t interval on logs (Student, n - 1 degrees of freedom); no interval below 2 values."""
    if not values:
        return None, None, None
    logs = np.log(values)
    if len(logs) < 2:
        return float(np.exp(logs.mean())), None, None
    half = stats.t.ppf(0.5 + level / 2, len(logs) - 1) * logs.std(ddof=1) / math.sqrt(len(logs))
    return float(np.exp(logs.mean())), float(np.exp(logs.mean() - half)), float(np.exp(logs.mean() + half))


def summary(reaches: Sequence[Reach | None], level: float = 0.95) -> RatioSummary:
    present = [r for r in reaches if r is not None]
    ratios = [r.ratio for r in present if r.ratio is not None]
    mean, low, high = _geometric(ratios, level)
    if len(ratios) < len(present):
        low = high = None
    return RatioSummary(mean, low, high, len(ratios), len(present), _geometric([r.loss_ratio for r in present], level))


def study_efficiency(seed_dirs: Sequence[Path]) -> dict:
    """Per comparison of :data:`COMPARISONS`: every seed's :class:`Reach` and the :class:`RatioSummary`."""
    out = {}
    for name, metric, window, before in COMPARISONS:
        reaches = [reach(d, metric, window, before) for d in seed_dirs]
        out[name] = {"metric": metric, "per_seed": reaches, "summary": summary(reaches)}
    return out


def markdown(eff: dict, seeds: Sequence[int], chained: bool = True) -> str:
    """``chained``: the detail window's steps include the shape window's (the study's chain), else each window was
    trained on its own."""
    counted = " (the detail window's include the shape window's)" if chained else ""
    lines = ["## Steps to the full-range model's final in-window loss", "",
             "Step ratio = the full-range model's steps / the window's steps to reach its final loss in the window "
             "(above 1: the window is faster); geometric mean over training seeds with a 95% t interval on log "
             f"ratios; per seed, the window's steps{counted}. `–`: not reached within the window's budget (then no "
             "interval: those seeds' ratios are lower). Final-loss ratio = the window's final in-window loss over "
             "the full-range model's (below 1: the window ends lower), geometric mean with its 95% t interval.", "",
             "| comparison | step ratio [95% interval] | reached | final-loss ratio [95% interval] | per seed: steps "
             "(validation interval) |", "|---|---|---|---|---|"]
    for name, e in eff.items():
        s: RatioSummary = e["summary"]
        if s.geometric_mean is None:
            ratio = "–"
        elif s.low is None and s.reached < s.seeds:
            ratio = f"{s.geometric_mean:.2f} (reached seeds only)"
        elif s.low is None:
            ratio = f"{s.geometric_mean:.2f}"
        else:
            ratio = f"{s.geometric_mean:.2f} [{s.low:.2f}, {s.high:.2f}]"
        per = ", ".join(f"{seed}: –" if r is None else f"{seed}: {r.steps or '–'} of {r.full_steps} (every "
                        f"{r.interval})" for seed, r in zip(seeds, e["per_seed"]))
        lm, ll, lh = s.loss_ratio
        loss = "–" if lm is None else (f"{lm:.3f}" if ll is None else f"{lm:.3f} [{ll:.3f}, {lh:.3f}]")
        lines.append(f"| {name} | {ratio} | {s.reached} of {s.seeds} | {loss} | {per} |")
    return "\n".join(lines) + "\n"


def to_json(eff: dict, seeds: Sequence[int]) -> dict:
    return {name: {"metric": e["metric"], "summary": e["summary"].__dict__,
                   "per_seed": {str(seed): (None if r is None else {**r.__dict__, "ratio": r.ratio,
                                                                    "loss_ratio": r.loss_ratio})
                                for seed, r in zip(seeds, e["per_seed"])}}
            for name, e in eff.items()}

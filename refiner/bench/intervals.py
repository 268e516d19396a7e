"""Confidence intervals for artifact rates measured over training seeds and images (issue 22).

The data of one method on one source is a 0/1 matrix ``broken[k, i]``: training seed ``k``, image ``i``. Every seed
refines the same images (the benchmark's seeds fix them), so seeds and images are crossed, and two methods measured
on the same seeds and images are paired.

:func:`two_level_bootstrap` resamples both levels: training seeds with replacement, then images with replacement,
the same image draw for every resampled seed (the images are crossed with the seeds) and for every method (the
pairing). It is the crossed-random-effects bootstrap of Owen, "The pigeonhole bootstrap", Ann. Appl. Stat. 1(2),
2007, restricted to its two factors; its percentile interval accounts for the spread between trained models and for
the finite image set at once. With one seed it reduces to the ordinary bootstrap over images, whose interval tends to
the Wald interval ``p ± 1.96 sqrt(p(1-p)/n)`` (tested). Hand-written because it is twenty lines of numpy, and
``scipy.stats.bootstrap`` resamples one level only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
RESAMPLES = 4000


@dataclass(frozen=True)
class Estimate:
    """A mean with its ``level`` percentile interval ``[low, high]`` and the per-seed means it came from."""

    mean: float
    low: float
    high: float
    per_seed: tuple[float, ...]

    @property
    def seed_sd(self) -> float:
        """The standard deviation of the per-seed means (ddof 1; 0 with one seed): the spread between trained models."""
        return float(np.std(self.per_seed, ddof=1)) if len(self.per_seed) > 1 else 0.0

    def verdict(self) -> str:
        """For a difference A − B of artifact rates: ``ahead`` (A lower: the interval lies below 0), ``behind``
        (above 0) or ``level`` (the interval holds 0)."""
        if self.high < 0:
            return "ahead"
        if self.low > 0:
            return "behind"
        return "level"


def _check(matrices: list[np.ndarray]) -> list[np.ndarray]:
    out = [np.asarray(m, dtype=np.float64) for m in matrices]
    if not out or out[0].ndim != 2 or out[0].size == 0:
        raise ValueError("expected a non-empty seeds x images matrix")
    if any(m.shape != out[0].shape for m in out):
        raise ValueError(f"paired matrices must have one shape, got {[m.shape for m in out]}")
    return out


def two_level_bootstrap(broken: np.ndarray, minus: np.ndarray | None = None, resamples: int = RESAMPLES,
                        level: float = LEVEL, seed: int = 0) -> Estimate:
    """The mean of ``broken`` (seeds x images), or of the paired difference ``broken - minus``, with its percentile
    interval from ``resamples`` two-level bootstrap draws (seeds, then images; see the module docstring). ``seed``
    seeds the draws, so a table is reproducible. The same ``seed`` gives the same draws for every matrix of one
    shape, so the intervals of several methods are computed on the same resamples."""
    (values,) = _check([broken]) if minus is None else [np.subtract(*_check([broken, minus]))]
    k, n = values.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, k, size=(resamples, k))
    images = rng.integers(0, n, size=(resamples, n))
    # mean over the resampled seeds of each seed's mean over the resampled images
    image_counts = np.zeros((resamples, n))
    np.add.at(image_counts, (np.arange(resamples)[:, None], images), 1.0)
    per_seed = values @ image_counts.T / n  # (k, resamples): seed j's mean on draw r's images
    stats = per_seed[seeds, np.arange(resamples)[:, None]].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return Estimate(float(values.mean()), float(low), float(high), tuple(float(x) for x in values.mean(axis=1)))

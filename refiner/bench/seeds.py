"""Training seeds as a dimension of the benchmark: one ``results.json`` per training seed in, one table out (issue 22).

:func:`outcomes` reads which images each method left broken (the benchmark's ``failed`` indices at one t_start) into
seeds x images 0/1 matrices; :func:`aggregate` gives, per method and source, the mean artifact rate over seeds and
images, the spread over seeds and a 95% interval from the two-level bootstrap (:mod:`refiner.bench.intervals`), and
the paired differences of :data:`PAIRS`. :func:`markdown` and :func:`rates_png` write them. The study that trains the
models and runs the benchmarks is ``refiner bench-seeds`` (:mod:`refiner.apps.seeds`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from refiner.bench.intervals import Estimate, two_level_bootstrap
from refiner.bench.report import SOURCE_TITLES, _figure_png, _pyplot

INPUT = "input"
PAIRS = (("chain", "full_range"), ("chain", "shape_window"), ("chain", "detail_window"))
NAMES = {INPUT: "input (no refinement)", "chain": "chain (shape + detail expert)",
         "full_range": "full-range model, equal compute", "shape_window": "shape expert alone",
         "detail_window": "detail expert alone"}


def outcomes(results: Sequence[Mapping], t_start: int) -> dict[str, dict[str, np.ndarray]]:
    """``{source: {method: broken}}`` with ``broken[k, i] = 1`` when image ``i`` failed the checker after ``method``
    at ``t_start`` in the benchmark of training seed ``k`` (``results[k]``), and the ``input`` row. Every result must
    have the same split, images and methods: the seeds differ only in the trained models."""
    if not results:
        raise ValueError("no benchmark results")
    first = results[0]
    for r in results[1:]:
        for key in ("split", "seeds", "n", "size"):
            if r.get(key) != first.get(key):
                raise ValueError(f"the seeds' benchmarks differ in {key}: {r.get(key)!r} vs {first.get(key)!r}")
    n = first["n"]
    out: dict[str, dict[str, np.ndarray]] = {}
    for source, entry in first["sources"].items():
        rows: dict[str, list[np.ndarray]] = {INPUT: []}
        for r in results:
            src = r["sources"][source]
            rows[INPUT].append(_flags(src[INPUT]["failed"], n))
            for method, m in src["methods"].items():
                point = next((p for p in m.get("sweep", []) if p.get("t_start") == t_start), None)
                if point is None:
                    continue
                rows.setdefault(method, []).append(_flags(point["failed"], n))
        out[source] = {m: np.stack(v) for m, v in rows.items() if len(v) == len(results)}
    return out


def _flags(failed: Sequence[int], n: int) -> np.ndarray:
    flags = np.zeros(n)
    flags[list(failed)] = 1.0
    return flags


def aggregate(matrices: Mapping[str, Mapping[str, np.ndarray]], pairs=PAIRS, seed: int = 0) -> dict:
    """Per source: ``rates[method]`` and ``differences["A - B"]`` as :class:`Estimate` (same bootstrap draws for
    every method of a source: ``seed``)."""
    out = {}
    for source, rows in matrices.items():
        rates = {m: two_level_bootstrap(b, seed=seed) for m, b in rows.items()}
        diffs = {f"{a} - {b}": two_level_bootstrap(rows[a], rows[b], seed=seed)
                 for a, b in pairs if a in rows and b in rows}
        out[source] = {"rates": rates, "differences": diffs}
    return out


def to_json(study: Mapping, seeds: Sequence[int], meta: Mapping) -> dict:
    def est(e: Estimate) -> dict:
        return {"mean": e.mean, "low": e.low, "high": e.high, "per_seed": list(e.per_seed), "seed_sd": e.seed_sd}

    return {**meta, "training_seeds": list(seeds), "sources": {
        s: {"rates": {m: est(e) for m, e in v["rates"].items()},
            "differences": {d: {**est(e), "verdict": e.verdict()} for d, e in v["differences"].items()}}
        for s, v in study.items()}}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(study: Mapping, seeds: Sequence[int], meta: Mapping) -> str:
    sources = list(study)
    lines = [f"# Artifact rate over {len(seeds)} training seeds ({', '.join(map(str, seeds))}): split "
             f"`{meta['split']}`, {meta['n']} images per source, t_start {meta['t_start']}", "",
             "Mean over seeds and images, with the 95% interval of the two-level bootstrap (training seeds, then "
             "images); in brackets the per-seed standard deviation. Lower is better.", "",
             "| method | " + " | ".join(SOURCE_TITLES.get(s, s) for s in sources) + " |",
             "|---|" + "---|" * len(sources)]
    methods = [m for m in NAMES if any(m in study[s]["rates"] for s in sources)]
    for m in methods:
        cells = []
        for s in sources:
            e = study[s]["rates"].get(m)
            cells.append("–" if e is None else f"{_pct(e.mean)}% [{_pct(e.low)}, {_pct(e.high)}] (sd {_pct(e.seed_sd)})")
        lines.append(f"| {NAMES[m]} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences (percentage points; negative: the first has fewer broken images). *ahead*: "
              "the interval lies below 0; *behind*: above 0; *level*: it holds 0.", "",
              "| difference | " + " | ".join(SOURCE_TITLES.get(s, s) for s in sources) + " |",
              "|---|" + "---|" * len(sources)]
    order = [f"{a} - {b}" for a, b in PAIRS]
    names = [d for d in order if any(d in study[s]["differences"] for s in sources)]
    for d in names:
        cells = []
        for s in sources:
            e = study[s]["differences"].get(d)
            cells.append("–" if e is None else f"{e.mean * 100:+.1f} [{e.low * 100:+.1f}, {e.high * 100:+.1f}] "
                                               f"{e.verdict()}")
        lines.append(f"| {d.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rates_png(study: Mapping) -> bytes:
    """One panel per source: each method's per-seed rates (dots) and its mean with the 95% interval (bar)."""
    plt = _pyplot()
    sources = list(study)
    fig, axes = plt.subplots(1, len(sources), figsize=(4.2 * len(sources), 3.6), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], sources):
        methods = [m for m in NAMES if m in study[s]["rates"]]
        for x, m in enumerate(methods):
            e = study[s]["rates"][m]
            ax.errorbar([x], [100 * e.mean], yerr=[[100 * (e.mean - e.low)], [100 * (e.high - e.mean)]], fmt="s",
                        color="black", capsize=4)
            ax.scatter(x + np.linspace(-0.15, 0.15, len(e.per_seed)), [100 * p for p in e.per_seed], s=14,
                       color="tab:blue", alpha=0.7)
        ax.set_xticks(range(len(methods)), [NAMES[m].split(" (")[0].replace("full-range model, equal compute",
                                                                             "full range") for m in methods],
                      rotation=30, ha="right")
        ax.set_title(SOURCE_TITLES.get(s, s), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("artifact rate, % (dots: training seeds)")
    return _figure_png(fig)


def read_results(paths: Sequence[Path]) -> list[dict]:
    return [json.loads(Path(p).read_text()) for p in paths]

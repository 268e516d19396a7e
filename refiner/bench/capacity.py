"""Where windows win: the chain against the equal-compute full-range model and against its shape expert alone, over
UNet widths and step budgets (issue 22, item 2). The blog's intuition: "you can train 500–1000 all together if the
model has enough parameters and you got enough compute", so windows should matter most when capacity or compute is
short.

Every cell (width, budget) is a ``refiner bench-seeds`` study (:mod:`refiner.apps.capacity` runs them);
:func:`cell_summary` reads one cell's per-seed benchmarks into the paired differences of :data:`PAIRS` with their
two-level bootstrap intervals (:mod:`refiner.bench.intervals`), :func:`markdown` and :func:`differences_png` put the
cells side by side, against training compute = UNet parameters x training steps of the chain (the full-range model's
steps, by construction equal).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from refiner.bench import seeds as study
from refiner.bench.report import SOURCE_TITLES, _figure_png, _pyplot

PAIRS = (("chain", "full_range"), ("chain", "shape_window"))
PAIR_TITLES = {"chain - full_range": "chain − full range (equal compute)", "chain - shape_window": "chain − shape alone"}


def cell_summary(results: Sequence[Mapping], t_start: int, seed: int = 0) -> dict:
    """``{source: {"rates": ..., "differences": ...}}`` of one cell's benchmarks (one per training seed), as
    :func:`refiner.bench.seeds.aggregate` with :data:`PAIRS`."""
    return study.aggregate(study.outcomes(results, t_start), pairs=PAIRS, seed=seed)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(cells: Sequence[Mapping], meta: Mapping) -> str:
    """``cells``: dicts with ``width``, ``budget``, ``params``, ``steps``, ``seeds`` (the training seeds read) and
    ``summary`` (:func:`cell_summary`, or None when no seed has finished)."""
    done = [c for c in cells if c["summary"] is not None]
    sources = list(done[0]["summary"]) if done else []
    lines = [f"# Chain against full range and shape alone, by UNet width and step budget: split `{meta['split']}`, "
             f"{meta['n']} images per source, t_start {meta['t_start']}", "",
             "Paired differences of artifact rates in percentage points (negative: the chain leaves fewer images "
             "broken), mean over training seeds and images with the 95% two-level bootstrap interval; *ahead*: the "
             "interval lies below 0, *behind*: above 0, *level*: it holds 0. Compute = UNet parameters x the "
             "chain's training steps (shape + detail = the full-range model's).", ""]
    for d in (f"{a} - {b}" for a, b in PAIRS):
        lines += [f"## {PAIR_TITLES[d]}", "", "| width | budget | params | steps | seeds | "
                  + " | ".join(SOURCE_TITLES.get(s, s) for s in sources) + " |",
                  "|---|---|---|---|---|" + "---|" * len(sources)]
        for c in cells:
            head = (f"| {c['width']} | {c['budget']:g}x | {c['params'] / 1e6:.2f} M | {c['steps']} | "
                    f"{', '.join(map(str, c['seeds'])) or 'none yet'} |")
            if c["summary"] is None:
                lines.append(head + " – |" * len(sources))
                continue
            cells_text = []
            for s in sources:
                e = c["summary"][s]["differences"].get(d)
                cells_text.append("–" if e is None else f"{e.mean * 100:+.1f} [{e.low * 100:+.1f}, "
                                                         f"{e.high * 100:+.1f}] {e.verdict()}")
            lines.append(head + " " + " | ".join(cells_text) + " |")
        lines.append("")
    lines += ["## Artifact rates", "", "| width | budget | method | "
              + " | ".join(SOURCE_TITLES.get(s, s) for s in sources) + " |", "|---|---|---|" + "---|" * len(sources)]
    for c in done:
        for m in ("chain", "full_range", "shape_window"):
            rates = [c["summary"][s]["rates"].get(m) for s in sources]
            lines.append(f"| {c['width']} | {c['budget']:g}x | {m.replace('_', ' ')} | " + " | ".join(
                "–" if e is None else f"{_pct(e.mean)}% [{_pct(e.low)}, {_pct(e.high)}]" for e in rates) + " |")
    return "\n".join(lines) + "\n"


def differences_png(cells: Sequence[Mapping]) -> bytes:
    """One panel per source: each difference of :data:`PAIRS` with its interval against compute (log x), one
    marker per width, budgets joined by a line."""
    plt = _pyplot()
    done = [c for c in cells if c["summary"] is not None]
    sources = list(done[0]["summary"]) if done else ["(no finished cell)"]
    fig, axes = plt.subplots(1, len(sources), figsize=(4.4 * len(sources), 3.8), sharey=True, squeeze=False)
    markers = dict(zip(sorted({c["width"] for c in cells}), "os^Dv"))
    colours = {"chain - full_range": "tab:blue", "chain - shape_window": "tab:orange"}
    for ax, s in zip(axes[0], sources):
        for d, colour in colours.items():
            for width in markers:
                row = sorted((c for c in done if c["width"] == width and d in c["summary"][s]["differences"]),
                             key=lambda c: c["params"] * c["steps"])
                if not row:
                    continue
                x = np.array([c["params"] * c["steps"] for c in row], dtype=float)
                e = [c["summary"][s]["differences"][d] for c in row]
                y = np.array([100 * v.mean for v in e])
                err = np.array([[100 * (v.mean - v.low) for v in e], [100 * (v.high - v.mean) for v in e]])
                ax.errorbar(x * (1.04 if d.endswith("shape_window") else 1.0), y, yerr=err, color=colour,
                            marker=markers[width], capsize=3, linestyle="-", alpha=0.85,
                            label=f"{PAIR_TITLES[d]}, width {width}")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("UNet parameters x training steps")
        ax.set_title(SOURCE_TITLES.get(s, s), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("difference of artifact rates, points")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(handles)), fontsize=7, frameon=False)
        fig.subplots_adjust(bottom=0.32)
    return _figure_png(fig)

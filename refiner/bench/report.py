"""The benchmark's outputs: ``results.json``, a Markdown table, a comparison grid, the trade-off plot and the
efficiency plot (matplotlib, Agg backend; every file is written atomically)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from refiner.bench.settings import EfficiencySettings
from refiner.io import atomic_write_bytes, atomic_write_text, json_float

SOURCE_TITLES = {"generator": "generator samples (real artifacts)", "f8": "VQ-f8 round trips",
                 "defects": "injected defects"}


def _figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------------ tables
def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def row_at(sweep: Sequence[Mapping], setting_name: str, setting: int) -> Mapping | None:
    """The sweep row measured at ``setting``, if any."""
    return next((r for r in sweep if r[setting_name] == setting), None)


def markdown(results: Mapping) -> str:
    """One summary table (every method at its grid setting, artifact rate per source) and one table per
    source with the whole sweep."""
    rec = results["recommended_t_start"]
    sources = list(results["sources"])
    lines = [f"# Composition benchmark: split `{results['split']}`, seeds {results['seeds']}, "
             f"{results['n']} images per source", "",
             f"Artifact rate = fraction of images failing the rule-based checker (lower is better). SWD×1e3 to "
             f"{results['n']} clean heads (lower is better). RMSE/SSIM to input = faithfulness (how much of the input "
             f"is kept). Diffusion methods take round((t_start+1)/{results['t_per_step']}) DDIM steps; the "
             f"generator samples take {results['generator_steps']} DDIM steps from pure noise.", "",
             f"## Artifact rate per source, each method at t_start {rec} (or its nearest sweep point)", "",
             "| method | " + " | ".join(sources) + " |", "|---|" + "---|" * len(sources)]
    lines.append("| input (no refinement) | " + " | ".join(
        f"{results['sources'][s]['input']['artifact_rate']:.1%}" for s in sources) + " |")
    for name, m in results["sources"][sources[0]]["methods"].items():
        setting_name = "t_start" if m["kind"] == "diffusion" else "amount_percent"
        setting = m["grid_setting"]
        cells = []
        for s in sources:
            row = row_at(results["sources"][s]["methods"][name]["sweep"], setting_name, setting)
            cells.append(f"{row['artifact_rate']:.1%}" if row else "–")
        unit = f"t_start {setting}" if m["kind"] == "diffusion" else f"{setting}%"
        lines.append(f"| {m['label']} ({unit}) | " + " | ".join(cells) + " |")
    for s in sources:
        entry = results["sources"][s]
        inp = entry["input"]
        lines += ["", f"## {SOURCE_TITLES.get(s, s)}", "",
                  "| method | setting | artifact rate | SWD×1e3 | RMSE to input | SSIM to input | PSNR to clean | s |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| input | – | {inp['artifact_rate']:.1%} | {inp['swd_x1e3']:.1f} | 0 | 1 | "
                  f"{_fmt(inp.get('psnr_to_clean'), 2)} | – |"]
        if "clean" in entry:
            c = entry["clean"]
            lines.append(f"| clean (reference) | – | {c['artifact_rate']:.1%} | {c['swd_x1e3']:.1f} | "
                         f"{c['rmse_to_input']:.4f} | {c['ssim_to_input']:.3f} | – | – |")
        for name, m in entry["methods"].items():
            for r in m["sweep"]:
                setting = f"t={r['t_start']}" if m["kind"] == "diffusion" else f"{r['amount_percent']}%"
                lines.append(f"| {m['label']} | {setting} | {r['artifact_rate']:.1%} | {r['swd_x1e3']:.1f} | "
                             f"{r['rmse_to_input']:.4f} | {r['ssim_to_input']:.3f} | "
                             f"{_fmt(r.get('psnr_to_clean'), 2)} | {r['seconds']:.1f} |")
    eff = results.get("efficiency") or {}
    if eff.get("available"):
        lines += ["", "## Efficiency: in-window validation loss against training steps", "",
                  f"Metric `{eff['metric']}` (the same fixed t and noise for both models).", "",
                  "| model | steps trained | final loss | first step at or below the other's final loss |",
                  "|---|---|---|---|"]
        for key in ("window", "full_range"):
            e = eff[key]
            lines.append(f"| {key.replace('_', '-')} | {e['steps'][-1]} | {e['losses'][-1]:.4f} | "
                         f"{_fmt(e.get('steps_to_other_final'))} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- plots
def tradeoff_png(results: Mapping) -> bytes:
    """Artifact rate against faithfulness (RMSE to the input), one curve per method over its sweep, one
    panel per source: SDEdit's realism/faithfulness trade-off."""
    plt = _pyplot()
    sources = list(results["sources"])
    fig, axes = plt.subplots(1, len(sources), figsize=(5.2 * len(sources), 4.4), squeeze=False)
    for ax, s in zip(axes[0], sources):
        entry = results["sources"][s]
        ax.axhline(entry["input"]["artifact_rate"], color="grey", ls="--", lw=1, label="input")
        for k, (name, m) in enumerate(entry["methods"].items()):
            xs = [r["rmse_to_input"] for r in m["sweep"]]
            ys = [r["artifact_rate"] for r in m["sweep"]]
            style = dict(marker="o" if m["kind"] == "diffusion" else "s", lw=2.2 if name == "chain" else 1.2)
            ax.plot(xs, ys, label=m["label"], color=f"C{k}", **style)
            for r, x, y in zip(m["sweep"], xs, ys):
                ax.annotate(str(r.get("t_start", f"{r.get('amount_percent')}%")), (x, y), fontsize=6,
                            xytext=(2, 2), textcoords="offset points", color=f"C{k}")
        ax.set_title(SOURCE_TITLES.get(s, s))
        ax.set_xlabel("RMSE to input (less = more faithful)")
        ax.set_ylabel("artifact rate (checker)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"split {results['split']}: artifact rate vs faithfulness (labels: t_start)", fontsize=10)
    return _figure_png(fig)


def grid_png(grid_images: Mapping[str, Mapping[str, Sequence[np.ndarray]]]) -> bytes:
    """Rows: the first images of each source; columns: input, clean (when known), each method at its grid
    setting."""
    plt = _pyplot()
    columns: list[str] = []
    for shown in grid_images.values():
        columns += [c for c in shown if c not in columns]
    rows = [(s, i) for s, shown in grid_images.items() for i in range(len(shown["input"]))]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(1.3 * len(columns), 1.3 * len(rows) + 0.6),
                             squeeze=False)
    for r, (s, i) in enumerate(rows):
        for c, col in enumerate(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            images = grid_images[s].get(col)
            if images is not None and i < len(images):
                ax.imshow(images[i], interpolation="nearest")
            else:
                ax.axis("off")
            if r == 0:
                ax.set_title(col, fontsize=6)
            if c == 0:
                ax.set_ylabel(s, fontsize=7)
    fig.subplots_adjust(wspace=0.04, hspace=0.04)
    return _figure_png(fig)


# ----------------------------------------------------------------------------------------- efficiency
def read_logged(run_dir: str | Path, metric: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``metric`` from a run's CSVLogger files (``<run>/csv/version_*/metrics.csv``),
    in step order; empty when the run or the metric is absent."""
    points: dict[int, float] = {}
    for path in sorted(Path(run_dir).glob("csv/version_*/metrics.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                value = row.get(metric)
                if value not in (None, ""):
                    points[int(row["step"])] = float(value)
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def first_step_at_or_below(steps: Sequence[int], losses: Sequence[float], target: float) -> int | None:
    return next((s for s, v in zip(steps, losses) if v <= target), None)


def efficiency(spec: EfficiencySettings | None) -> dict:
    """The blog's efficiency claim: the in-window validation loss of the window model and of the full-range
    model against their training steps, and the first step at which each reaches the other's final loss."""
    if spec is None:
        return {"available": False, "why": "no efficiency runs configured"}
    metric = str(spec.metric)
    runs = {"window": spec.window, "full_range": spec.full_range}
    curves = {key: read_logged(run, metric) for key, run in runs.items()}
    missing = [f"{runs[k]} ({metric})" for k, (steps, _) in curves.items() if not steps]
    if missing:
        return {"available": False, "metric": metric, "why": f"not logged by {', '.join(missing)}"}
    out = {"available": True, "metric": metric}
    for key, other in (("window", "full_range"), ("full_range", "window")):
        steps, losses = curves[key]
        out[key] = {"run": str(runs[key]), "steps": steps, "losses": losses,
                    "steps_to_other_final": first_step_at_or_below(steps, losses, curves[other][1][-1])}
    return out


def efficiency_png(eff: Mapping) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key, label in (("window", "window model"), ("full_range", "full-range model")):
        ax.plot(eff[key]["steps"], eff[key]["losses"], marker="o", label=label)
    ax.set_xlabel("training steps")
    ax.set_ylabel(eff["metric"])
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("in-window validation loss (same t and noise for both)", fontsize=9)
    return _figure_png(fig)


def _json_ready(x):
    """Nested results with every float through :func:`refiner.io.json_float`."""
    if isinstance(x, float):
        return json_float(x)
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    return x


def write_all(out_dir: Path, results: Mapping, grid_images) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results.json", json.dumps(_json_ready(results), indent=1))
    atomic_write_text(out_dir / "results.md", markdown(results))
    atomic_write_bytes(out_dir / "comparison_grid.png", grid_png(grid_images))
    atomic_write_bytes(out_dir / "tradeoff.png", tradeoff_png(results))
    eff = results.get("efficiency") or {}
    if eff.get("available"):
        atomic_write_bytes(out_dir / "efficiency.png", efficiency_png(eff))

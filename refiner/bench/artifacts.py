"""Detection and targeted correction on the composition benchmark: :func:`run` on
:class:`~refiner.bench.settings.BenchSettings`, its ``artifacts`` block
(:class:`~refiner.bench.artifact_settings.ArtifactsSettings`; ``refiner bench-artifacts [overrides]`` (or
``python -m refiner bench-artifacts``) over ``conf/bench.yaml``); the same seeds, sources, checkpoints and scoring as the
benchmark.

1. **Detection in input images** (ASCED's setting (b), :func:`refiner.inference.probe.probe_detect`): every
   detector's masks on the ``defects`` source against the injected defects' true masks, and on the ``generator``
   source against the checker's violation masks (:func:`refiner.artifacts.detect.mask_scores`).
2. **Detection during generation** (ASCED's own setting (a)): the benchmark's weak generator sampled again from the
   *same* noise with a detector watching and TTC correcting at ``t_correct``
   (:class:`refiner.artifacts.correct.TrajectoryCorrection`); its artifact rate against the plain samples'.
3. **Adaptive strength in refinement**: the chain at fixed t_starts, with ``t_start=auto`` (each image's start from
   its residual severity through the isotonic map; fitted and saved as ``t_start_auto.json`` on ``split=tune``,
   loaded from ``artifacts.calibration`` on any other split) and with region strength maps (flagged pixels start at
   the probe's t_start, the others at ``strength_t_low``; the residual mask grown by ``strength_dilate_px``), as
   points of artifact rate vs RMSE to the input. On ``split=tune`` the ``t_start=auto`` point is in-sample.
4. **Colour fix** (:mod:`refiner.artifacts.color_fix`; ``artifacts.color_fix``): each fixed t_start's outputs with
   the input's low band restored (StableSR's wavelet rule, capped or not, or AdaIN): the same UNet evaluations, a
   curve of its own.
5. **Paste back in pixel space** (:mod:`refiner.artifacts.composite`; ``artifacts.paste_back``): one of those
   refinements kept only inside a region (the probe's mask, or, in one pass without a probe, where the refinement
   itself changed the picture), grown and feathered, the input's own pixels elsewhere: as inpainting pipelines
   overlay their output (diffusers' ``apply_overlay``, AUTOMATIC1111's mask blur).

The UNet evaluations per image are reported with each point (the probe's included), and for each point the fixed
t_starts it Pareto-dominates (no more artifacts, no larger RMSE, one strictly less: :func:`dominated`).

Writes ``artifacts.json``, ``artifacts.md`` and ``artifacts_tradeoff.png`` into ``output_dir``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from refiner.artifacts.composite import (
    change_config,
    changed_region,
    paste_back,
    paste_weights,
)
from refiner.artifacts.correct import (
    AutoStart,
    TrajectoryCorrection,
    fit_auto_start,
    starts_from_strength,
)
from refiner.artifacts.detect import (
    Detection,
    asced_paper_mask,
    dilate,
    mask_scores,
    pixel_change_mask,
    pixel_from_latent,
)
from refiner.artifacts.dynamics import StepRecorder, chain_callbacks
from refiner.bench.artifact_settings import PastePoint
from refiner.bench.methods import BenchError, score
from refiner.bench.report import _figure_png, _json_ready, _pyplot
from refiner.bench.run import (
    Models,
    build_sources,
    chain_method,
    check_output_dir,
    refine_all,
)
from refiner.bench.settings import BenchSettings, SplitSeeds
from refiner.bench.sources import clean_heads
from refiner.data.checker import check_batch
from refiner.inference.probe import probe_detect, probe_t_end
from refiner.io import atomic_write_bytes, atomic_write_text
from refiner.sampling import steps_for
from refiner.settings import to_plain

log = logging.getLogger(__name__)

WRITTEN_BY = "refiner bench.artifacts"
OUTPUT_FILES = ("artifacts.json", "artifacts.md", "artifacts_tradeoff.png", "t_start_auto.json")


def _batches(n: int, size: int):
    return [list(range(k, min(n, k + size))) for k in range(0, n, size)]


def _detect_all(pipe, images, method: str, t_start: int, steps: int, settings: BenchSettings) -> Detection:
    parts = [probe_detect(pipe, [images[i] for i in idx], method, t_start, steps, seed=settings.seed, indices=idx)
             for idx in _batches(len(images), settings.batch_size)]
    return Detection(torch.cat([p.latent for p in parts]), torch.cat([p.pixel for p in parts]),
                     torch.cat([p.severity for p in parts]), method)


# ------------------------------------------------------------------------------------------- 1. detection
def detection_quality(pipe, sets, settings: BenchSettings, probe_steps: int) -> tuple[dict, dict]:
    out, detections = {}, {}
    for name, art in sets.items():
        if name == "defects":
            truth = torch.from_numpy(np.stack(art.masks)).bool()
        else:
            truth = torch.from_numpy(np.stack([r.violation_mask for r in check_batch(art.inputs)]))
        for method in settings.artifacts.detectors:
            t0 = time.perf_counter()
            det = _detect_all(pipe, art.inputs, method, settings.artifacts.probe_t_start, probe_steps, settings)
            seconds = time.perf_counter() - t0
            out.setdefault(name, {})[method] = {**mask_scores(det.pixel, truth), "seconds": round(seconds, 2),
                                                "truth": "injected masks" if name == "defects" else "checker"}
            if art.clean is not None:  # the same heads without their defect: image-level false alarms
                clean = _detect_all(pipe, art.clean, method, settings.artifacts.probe_t_start, probe_steps, settings)
                out[name][method]["clean_images_flagged"] = float(clean.pixel.flatten(1).any(1).float().mean())
                out[name][method]["clean_flagged_fraction"] = float(clean.area.mean())
            detections[(name, method)] = det
            log.info("detect %s / %s: pixel IoU %.3f (%.1f s)", name, method, out[name][method]["pixel_iou"], seconds)
    return out, detections


# ------------------------------------------------------------------------------------------- 2. generation + TTC
def watching_recorder(chain, settings: BenchSettings, methods) -> StepRecorder:
    """A recorder of what ``methods`` (``artifacts.ttc`` detectors) read over the bank ``(t_correct, t_detect]``."""
    a = settings.artifacts.ttc
    return StepRecorder(chain.alphas_cumprod, chain.experts[0].weights.parameterization, t_low=a.t_correct,
                        t_high=a.t_detect, keep_scores="asced" in methods, keep_x0="asced_code" in methods)


def detect_from_recorder(method: str, rec: StepRecorder, chain, f4, settings: BenchSettings) -> Detection:
    """ASCED's detection during generation from what ``rec`` saw: ``asced`` (the paper's score bank) or
    ``asced_code`` (the public code's rule on the decoded x0 predictions)."""
    a = settings.artifacts.ttc
    if method == "asced":
        return asced_paper_mask(rec.timesteps, rec.scores, t_correct=a.t_correct, t_detect=a.t_detect,
                                factor=int(f4.factor))
    decoded = [f4.decode(z / chain.scale_factor).clamp(-1, 1) for z in rec.x0]
    return pixel_change_mask(decoded, factor=int(f4.factor))


def correction_noise(seeds: SplitSeeds, idx: list[int]) -> torch.Generator:
    """The fresh noise of TTC for the batch of images ``idx`` (every corrected generation draws the same)."""
    return torch.Generator().manual_seed(seeds.generator + idx[0] + 7)


@torch.no_grad()
def generate_with_ttc(models: Models, settings: BenchSettings, seeds: SplitSeeds, method: str
                      ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The generator source again (:func:`refiner.bench.run.build_sources`: same noise, seed + i), with ``method``
    watching each batch and TTC correcting; returns the images and each image's latent mask."""
    chain, f4 = models.pipelines[models.generator_experts].chain, models.f4
    param, a = chain.experts[0].weights.parameterization, settings.artifacts.ttc
    side = settings.size // f4.factor
    corrections: list[tuple[int, TrajectoryCorrection]] = []

    def callback_for(idx: list[int], grid: list[int]):
        rec = watching_recorder(chain, settings, [method])
        ttc = TrajectoryCorrection(grid, chain.alphas_cumprod,
                                   lambda: detect_from_recorder(method, rec, chain, f4, settings).latent,
                                   a.t_correct, gamma=float(a.gamma), correction_eta=float(a.correction_eta),
                                   parameterization=param, generator=correction_noise(seeds, idx))
        corrections.append((len(idx), ttc))
        return chain_callbacks([rec, ttc])

    images = build_sources(settings, seeds, ["generator"], models,
                           generator_callback_for=callback_for)["generator"].inputs
    masks = [m for count, ttc in corrections
             for m in (list(ttc.mask[:, 0].bool().cpu().numpy()) if ttc.mask is not None
                       else [np.zeros((side, side), dtype=bool)] * count)]
    return images, masks


# ------------------------------------------------------------------------------------------- 3. adaptive strength
def _needed_t(pipe, images, t_starts, settings: BenchSettings) -> tuple[np.ndarray, dict]:
    """Per image, the smallest swept t_start whose refinement passes the checker (the largest when none does); also
    the fixed-t outputs, reused as the sweep's points."""
    outputs = {t: refine_all(pipe, images, t, settings) for t in t_starts}
    passed = {t: [r.passed for r in check_batch(outs)] for t, outs in outputs.items()}
    needed = [next((t for t in sorted(t_starts) if passed[t][i]), max(t_starts)) for i in range(len(images))]
    return np.asarray(needed, dtype=float), outputs


def paste_rows(art, bases: dict, probe: Detection, probe_steps: int, points: list[PastePoint], factor: int,
               references) -> list[dict]:
    """Paste-back points (:mod:`refiner.artifacts.composite`): for each spec, the refinement ``bases[onto]`` (its
    outputs, UNet evaluations per image, name, and whether it ran the probe; a probe region adds ``probe_steps`` to
    a refinement that did not) kept inside its region (the probe's detection, or the
    :func:`~refiner.artifacts.composite.changed_region` of that refinement) grown by ``grow`` and feathered by
    ``feather``; images whose severity exceeds ``whole_above`` keep their whole refinement."""
    rows, changed = [], {}
    for point in points:
        onto, region = point.onto, point.region
        outs, evals, name, probed = bases[onto]
        if region == "probe" and not probed:
            evals += probe_steps
        label, level = point.rule()
        if region == "probe":
            det = probe
        else:
            if (onto, region) not in changed:
                changed[(onto, region)] = changed_region(art.inputs, outs, factor=factor, cfg=change_config(level))
            det = changed[(onto, region)]
        above = point.whole_above
        weights = paste_weights(dilate(det.pixel, point.grow).float(), point.feather, det.severity,
                                None if above is None else float(above))
        whole = "" if above is None else f", whole image above severity {above}"
        rows.append({"point": f"paste back ({name}; {label} mask, grow {point.grow}, feather {point.feather}{whole})",
                     "unet_evals": evals, "refined_fraction": float(weights.mean()),
                     "whole_images": int((weights.flatten(1) == 1).all(1).sum()),
                     **score(paste_back(outs, art.inputs, weights), art.inputs, references, art.clean)})
    return rows


def dominated(rows: list[dict]) -> dict:
    """Which fixed-t_start points each other point dominates (Pareto): no more artifacts and no larger RMSE to the
    input, and strictly less of one of them. ``all`` lists the points that dominate every fixed point at once,
    ``covered`` says whether every fixed point is dominated by some point."""
    fixed = [r for r in rows if r["point"].startswith("fixed")]
    out = {}
    for r in rows:
        if r["point"].startswith("fixed"):
            continue
        rate, rmse = r["artifact_rate"], r["rmse_to_input"]
        out[r["point"]] = [f["point"] for f in fixed if rate <= f["artifact_rate"] and rmse <= f["rmse_to_input"]
                           and (rate < f["artifact_rate"] or rmse < f["rmse_to_input"])]
    return {"by_point": out, "all": [p for p, beaten in out.items() if len(beaten) == len(fixed)],
            "covered": sorted({f for beaten in out.values() for f in beaten}) == sorted(f["point"] for f in fixed)}


def adaptive_points(pipe, sets, detections, settings: BenchSettings, out_dir: Path, probe_steps: int, references
                    ) -> tuple[dict, dict]:
    """Section 3; ``detections[(source, "residual")]`` (from :func:`detection_quality`) gives the severities and masks.
    On ``split=tune`` the ``t_start=auto`` map is fitted first (on every source's needed starts) and its points are
    in-sample; other splits load it."""
    s, points, calibration = settings, {}, {}
    a = s.artifacts
    t_starts, top = list(a.t_starts), a.probe_t_start
    factor, specs, fixes = int(pipe.f4.factor), a.paste_back.all_points(), a.color_fix
    fixed, needed = {}, {}
    for name in a.sources:
        needed[name], fixed[name] = _needed_t(pipe, sets[name].inputs, t_starts, s)
    if s.split == "tune":
        sev = np.concatenate([detections[(name, "residual")].severity.numpy() for name in a.sources])
        need = np.concatenate([needed[name] for name in a.sources])
        auto = fit_auto_start(sev.tolist(), need.tolist(), min(t_starts), max(t_starts),
                              chain={"experts": list(chain_method(s, t_starts).experts)},
                              source={"split": s.split, "seeds": to_plain(s.split_seeds), "n": s.n,
                                      "sources": list(a.sources), "detector": "residual"})
        auto.save(out_dir / "t_start_auto.json")
    else:
        auto = AutoStart.load(a.calibration)
    probe_cost = probe_steps + steps_for(top, s.t_per_step)
    for name in a.sources:
        art = sets[name]
        rows = [{"point": f"fixed t_start {t}", "unet_evals": steps_for(t, s.t_per_step),
                 **score(fixed[name][t], art.inputs, references, art.clean)} for t in t_starts]
        det = detections[(name, "residual")]
        starts_i = auto(det.severity.numpy())
        starts = torch.tensor(starts_i)[:, None, None].expand(len(art.inputs), s.size, s.size)
        auto_outs = refine_all(pipe, art.inputs, max(starts_i), s, starts=starts)
        auto_cost = probe_steps + steps_for(max(starts_i), s.t_per_step)
        rows.append({"point": "t_start=auto (residual severity)" + (" [in-sample]" if s.split == "tune" else ""),
                     "mean_t_start": float(np.mean(starts_i)), "unet_evals": auto_cost,
                     **score(auto_outs, art.inputs, references, art.clean)})
        strength_outs = {}
        for grow, t_low, label in a.strength_maps():
            starts = starts_from_strength(dilate(det.pixel, grow).float(), t_low, top)
            strength_outs[label] = refine_all(pipe, art.inputs, top, s, starts=starts)
            rows.append({"point": f"strength map (residual; {label})", "unet_evals": probe_cost,
                         **score(strength_outs[label], art.inputs, references, art.clean)})
        base = fixed[name][top] if top in fixed[name] else refine_all(pipe, art.inputs, top, s)
        fixed_colours = {(fix, t): fix(fixed[name][t], art.inputs) for fix in fixes for t in t_starts}
        bases = {"fixed": (base, steps_for(top, s.t_per_step), f"fixed t_start {top}", False),
                 **{f"fixed t_start {t}": (outs, steps_for(t, s.t_per_step), f"fixed t_start {t}", False)
                    for t, outs in fixed[name].items()},
                 **{f"{fix.label()} on fixed t_start {t}": (fixed_colours[(fix, t)], steps_for(t, s.t_per_step),
                                                            f"{fix.label()} on fixed t_start {t}", False)
                    for fix in fixes for t in t_starts},
                 "t_start=auto": (auto_outs, auto_cost, "t_start=auto", True),
                 **{f"strength map ({label})": (outs, probe_cost, f"strength map ({label})", True)
                    for label, outs in strength_outs.items()}}
        rows += paste_rows(art, bases, det, probe_steps, specs, factor, references)
        rows += [{"point": f"{fix.label()} on fixed t_start {t}", "family": f"{fix.label()} on fixed t_start ·",
                  "unet_evals": steps_for(t, s.t_per_step),
                  **score(fixed_colours[(fix, t)], art.inputs, references, art.clean)}
                 for fix in fixes for t in t_starts]
        for r in rows:
            r.pop("failed", None)
            log.info("%s / %s: artifact rate %.3f, rmse %.4f", name, r["point"], r["artifact_rate"], r["rmse_to_input"])
        points[name] = {"rows": rows, "dominance": dominated(rows),
                        "severity": {"probe": _quantiles(det.severity),
                                     "output": _quantiles(changed_region(art.inputs, base, factor=factor).severity)}}
    return points, {"knots": auto.knots}


def _quantiles(values: torch.Tensor) -> dict:
    q = np.quantile(values.numpy(), [0.1, 0.5, 0.9])
    return {"p10": float(q[0]), "median": float(q[1]), "p90": float(q[2])}


# ------------------------------------------------------------------------------------------- report
def markdown(res: dict) -> str:
    f = lambda x: "–" if x is None or (isinstance(x, float) and x != x) else (f"{x:.3f}" if isinstance(x, float) else str(x))  # noqa: E731
    lines = [f"# Artifact detection and targeted correction: split `{res['split']}`, seeds {res['seeds']}, "
             f"{res['n']} images per source", "", "## Detection in input images (probe from t_start "
             f"{res['probe_t_start']}, {res['probe_steps']} steps)", "",
             "| source (truth) | detector | pixel IoU | pixel precision | pixel recall | mean image IoU | "
             "image recall | flagged | clean images flagged (flagged) | s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, per in res["detection"].items():
        for m, s in per.items():
            neg = (f"{f(s['clean_images_flagged'])} ({f(s['clean_flagged_fraction'])})"
                   if "clean_images_flagged" in s else "–")
            lines.append(f"| {name} ({s['truth']}) | {m} | {f(s['pixel_iou'])} | {f(s['pixel_precision'])} | "
                         f"{f(s['pixel_recall'])} | {f(s['mean_image_iou'])} | {f(s['image_recall'])} | "
                         f"{f(s['flagged_fraction'])} | {neg} | {s['seconds']} |")
    lines += ["", "## Generation with ASCED + TTC (same noise as the plain generator)", "",
              "| detector | artifact rate plain | artifact rate with TTC | masked | RMSE to plain outside / inside "
              "the mask |", "|---|---|---|---|---|"]
    for m, s in res["generation"].items():
        lines.append(f"| {m} | {f(s['plain_artifact_rate'])} | {f(s['ttc_artifact_rate'])} | {f(s['masked_fraction'])} "
                     f"| {f(s['rmse_outside_mask'])} / {f(s['rmse_inside_mask'])} |")
    for name, entry in res["adaptive"].items():
        lines += ["", f"## Refinement of `{name}`: fixed t_start vs adaptive strength", "",
                  "| point | artifact rate | RMSE to input | SWD×1e3 | UNet evals/image | fixed points dominated |",
                  "|---|---|---|---|---|---|"]
        beaten = entry["dominance"]["by_point"]
        for r in entry["rows"]:
            wins = beaten.get(r["point"])
            wins = "–" if wins is None else (", ".join(w.replace("fixed t_start ", "") for w in wins) or "none")
            lines.append(f"| {r['point']} | {f(r['artifact_rate'])} | {f(r['rmse_to_input'])} | {f(r['swd_x1e3'])} | "
                         f"{r['unet_evals']} | {wins} |")
        d = entry["dominance"]
        lines += ["", f"Points that dominate every fixed t_start (no more artifacts, no larger RMSE, one strictly less): "
                      f"{', '.join(d['all']) or 'none'}; every fixed point dominated by some point: "
                      f"{'yes' if d['covered'] else 'no'}."]
    return "\n".join(lines) + "\n"


def families(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """Rows whose labels differ only in their numbers form one family (a curve in the plot: the fixed t_starts, the
    strength maps' t_low, the one-pass change levels); its name puts ``·`` where the numbers vary. A row's own
    ``family`` (a name) overrides that grouping."""
    import re

    groups: dict[str, list[dict]] = {}
    named: dict[str, str] = {}
    for r in rows:
        key = r.get("family") or re.sub(r"\d+(\.\d+)?", "#", r["point"])
        if r.get("family"):
            named[key] = r["family"]
        groups.setdefault(key, []).append(r)
    out = []
    for key, members in groups.items():
        if key in named:
            out.append((named[key], members))
            continue
        parts = [re.split(r"(\d+(?:\.\d+)?)", m["point"]) for m in members]
        name = "".join("·" if k % 2 and len({p[k] for p in parts}) > 1 else piece
                       for k, piece in enumerate(parts[0]))
        out.append((name, members))
    return out


def tradeoff_png(res: dict) -> bytes:

    plt = _pyplot()
    names = list(res["adaptive"])
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(6.4 * max(1, len(names)), 5.6), squeeze=False)
    colours, handles = {}, {}  # one colour per family across the panels, one legend below them
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes[0], names):
        for label, members in families(res["adaptive"][name]["rows"]):
            fixed = label.startswith("fixed")
            marker = "o" if fixed else ("P" if "paste back" in label else ("s" if "strength" in label else
                                                                             ("D" if "colour fix" in label else "*")))
            colour = "black" if fixed else colours.setdefault(label, cycle[len(colours) % len(cycle)])
            handles[label], = ax.plot([r["rmse_to_input"] for r in members], [r["artifact_rate"] for r in members],
                                      f"{marker}-" if len(members) > 1 else marker, color=colour,
                                      linewidth=2 if fixed else 1, markersize=6 if len(members) > 1 else 9)
        ax.set_xlabel("RMSE to input (lower = more faithful)")
        ax.set_ylabel("artifact rate (lower is better)")
        ax.set_title(name)
    fig.legend(list(handles.values()), list(handles), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2,
               fontsize=7, frameon=False)
    return _figure_png(fig)


@torch.no_grad()
def run(settings: BenchSettings) -> dict:
    """Sections 1-5 of the module docstring on ``settings``; writes ``artifacts.json``, ``artifacts.md`` and
    ``artifacts_tradeoff.png`` (and on ``split=tune`` ``t_start_auto.json``) into ``settings.output_dir``."""
    s, a = settings, settings.artifacts
    seeds = s.split_seeds
    out_dir = Path(s.output_dir)
    check_output_dir(out_dir, s.overwrite, OUTPUT_FILES, OUTPUT_FILES[0], WRITTEN_BY, "this command")
    if s.split != "tune" and not Path(str(a.calibration)).is_file():
        raise BenchError(f"artifacts.calibration {a.calibration} not found: run split=tune first (it writes "
                         "t_start_auto.json), or point artifacts.calibration at one")
    chain = chain_method(s, a.t_starts)
    sources = ["generator", "defects"]
    models = Models(s, [chain], sources)
    pipe = models.pipelines[chain.experts]
    references = clean_heads(s.n, seeds.references, s.size)
    sets = build_sources(s, seeds, sources, models)
    top = a.probe_t_start
    probe_steps = steps_for(top - probe_t_end(pipe.chain, top), s.t_per_step)

    detection, detections = detection_quality(pipe, sets, s, probe_steps)
    generation = {}
    plain = sets["generator"].inputs
    plain_rate = np.mean([not r.passed for r in check_batch(plain)])
    for method in a.ttc.detectors:
        t0 = time.perf_counter()
        images, masks = generate_with_ttc(models, s, seeds, method)
        outside = ~pixel_from_latent(torch.from_numpy(np.stack(masks)).bool(), int(models.f4.factor))
        diff = torch.from_numpy(np.stack(images).astype(np.float32) - np.stack(plain).astype(np.float32)) / 255
        generation[method] = {"plain_artifact_rate": float(plain_rate),
                              "masked_fraction": float(1 - outside.float().mean()),
                              "rmse_outside_mask": float(diff[outside].pow(2).mean().sqrt()) if outside.any() else None,
                              "rmse_inside_mask": float(diff[~outside].pow(2).mean().sqrt()) if (~outside).any() else None,
                              "ttc_artifact_rate": float(np.mean([not r.passed for r in check_batch(images)])),
                              "changed": int(sum(not np.array_equal(p, q) for p, q in zip(plain, images))),
                              "seconds": round(time.perf_counter() - t0, 2)}
    adaptive, calibration = adaptive_points(pipe, sets, detections, s, out_dir, probe_steps, references)
    res = {"written_by": WRITTEN_BY, "split": s.split, "seeds": to_plain(seeds), "n": s.n, "size": s.size,
           "probe_t_start": top, "probe_steps": probe_steps, "settings": to_plain(a),
           "detection": detection, "generation": generation, "adaptive": adaptive, "calibration": calibration}
    out_dir.mkdir(parents=True, exist_ok=True)

    atomic_write_text(out_dir / "artifacts.json", json.dumps(_json_ready(res), indent=2) + "\n")
    atomic_write_text(out_dir / "artifacts.md", markdown(res))
    atomic_write_bytes(out_dir / "artifacts_tradeoff.png", tradeoff_png(res))
    return res


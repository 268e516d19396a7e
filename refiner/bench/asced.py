"""ASCED at its own operating point: ``refiner bench-asced`` (issue 23, item 1).

ASCED (Cao et al., "Temporal Score Analysis for Understanding and Correcting Diffusion Artifacts", CVPR 2025, arXiv
2503.16218) flags artifacts *during generation*, from abnormal changes of the weighted score in the "mutation" phase
above the correction step ``T_c``, and corrects them there (TTC). The paper samples with DDIM at NFE 25 (its sec. 4;
sec. 7.1 also 50) from models whose samples are mostly well formed with local faults. This study puts it there on our
domain: the full-range generator ``generator.experts`` sampled from pure noise with each of ``asced.nfe`` DDIM steps
(noise of image ``i`` from ``seeds.generator + i``, as the benchmark's generator source), the detectors
``artifacts.ttc.detectors`` watching, the checker as the truth. For each NFE:

1. **Detection during generation.** One plain run records the weighted scores and x0 predictions over the bank
   ``(t_correct, t_detect]``; each detector's masks and severities come from it (:mod:`refiner.artifacts.detect`).
   TTC's detection is this same one: the corrected and the plain trajectories agree until ``T_c`` (tested).

   * image level (broken or well formed, by the checker): the ROC AUC of the severity, and accuracy, balanced
     accuracy, precision and recall of ``severity > threshold`` at the threshold with the best balanced accuracy on
     ``asced.calibration_split``'s samples (:func:`best_threshold`). Chance is an AUC and a balanced accuracy of
     0.5, and for the accuracy the majority rule's.
   * pixel level: IoU, precision and recall of the masks against the checker's violation masks, pooled over images
     (:func:`refiner.artifacts.detect.mask_scores`).
2. **The score trap**, the paper's mechanism: its statistic ``d = || g_{t_i} - g_{t_{i-1}} ||`` per latent pixel
   over the bank, in the checker's violation regions of broken samples, in the rest of broken samples and in
   well-formed samples: quantiles of the per-pixel bank mean, the pixel ROC AUC of violation regions against
   well-formed samples, and the median per bank step (:func:`score_trap`; plotted in ``asced_score_trap.png``).
3. **TTC** at ``T_c`` with each detector's mask against the same samples without it, at equal NFE: the correction
   replaces the masked latent at the first grid point at or below ``T_c`` and sampling goes on, with no extra UNet
   evaluation, as the public code does. With ``asced.random_masks`` also the same correction with a random latent
   mask of each image's flagged area: the control for the place of the mask.
4. **The cheapest alternative without a trajectory**: the window chain ``methods.chain`` on the finished plain
   samples from ``T_c``, with as many steps as the generation grid has at or below ``T_c`` (what re-running from
   ``T_c`` costs), and at the benchmark's density ``steps_for(T_c)``.

Every rate has a 95% percentile bootstrap interval over images (:func:`refiner.bench.intervals.two_level_bootstrap`
with one training seed; paired for differences), the AUCs and thresholded scores their own
(:func:`image_detection`). Writes ``asced.json``, ``asced.md`` and ``asced_score_trap.png`` into ``output_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from sklearn.metrics import roc_auc_score

from refiner.artifacts.correct import TrajectoryCorrection
from refiner.artifacts.detect import Detection, latent_from_pixel, mask_scores, pixel_from_latent, score_dynamics
from refiner.bench.artifacts import correction_noise, detect_from_recorder, watching_recorder
from refiner.bench.intervals import two_level_bootstrap
from refiner.bench.methods import BenchError, score
from refiner.bench.report import _figure_png, _json_ready, _pyplot
from refiner.bench.run import Models, build_sources, chain_method, check_output_dir, refine_all
from refiner.bench.settings import BenchSettings, SplitSeeds
from refiner.bench.sources import clean_heads
from refiner.data.checker import check_batch
from refiner.io import atomic_write_bytes, atomic_write_text
from refiner.sampling import steps_for, timestep_grid
from refiner.settings import to_plain

log = logging.getLogger(__name__)

WRITTEN_BY = "refiner bench-asced"
OUTPUT_FILES = ("asced.json", "asced.md", "asced_score_trap.png")
RESAMPLES = 2000
GROUPS = ("violation regions of broken samples", "elsewhere in broken samples", "well-formed samples")


def generation_grid(nfe: int, num_timesteps: int = 1000) -> list[int]:
    """The generator's DDIM grid at ``nfe`` steps (:func:`refiner.bench.sources.generator_samples`'s)."""
    return timestep_grid(num_timesteps - 1, nfe, 0, "uniform", num_timesteps)


def check_bank(settings: BenchSettings) -> None:
    """The calibration split must exist, and each NFE's grid must put at least two points in the bank ``(t_correct,
    t_detect]`` (one score change) and one at or below ``t_correct``; refused with one line before anything loads."""
    a = settings.artifacts.ttc
    if settings.asced.calibration_split not in settings.seeds:
        raise BenchError(f"asced.calibration_split must be one of {sorted(settings.seeds)}, got "
                         f"{settings.asced.calibration_split!r}")
    if not settings.artifacts.ttc.detectors:
        raise BenchError("artifacts.ttc.detectors is empty: name the detectors to study (asced, asced_code)")
    for nfe in settings.asced.nfe:
        grid = generation_grid(nfe)
        inside = [t for t in grid if a.t_correct < t <= a.t_detect]
        if len(inside) < 2 or grid[-1] > a.t_correct:
            raise BenchError(f"asced.nfe: {nfe} DDIM steps put {len(inside)} grid point(s) in the score bank "
                             f"({a.t_correct}, {a.t_detect}] (artifacts.ttc); ASCED needs at least 2, and a point "
                             f"at or below t_correct")


def with_steps(settings: BenchSettings, nfe: int) -> BenchSettings:
    return dataclasses.replace(settings, generator=dataclasses.replace(settings.generator, steps=nfe))


@dataclass
class Watched:
    """A plain generation and what its detectors saw: images, the checker's verdicts and violation masks
    ((n, H, W) bool), each detector's :class:`Detection`, the bank's later-step t per change and the changes
    ``d`` ((K, n, h, w))."""

    images: list[np.ndarray]
    broken: np.ndarray
    violation: Tensor
    detections: dict[str, Detection]
    bank_t: list[int]
    changes: Tensor


@torch.no_grad()
def watch(models: Models, settings: BenchSettings, seeds: SplitSeeds) -> Watched:
    """The generator source at ``settings.generator.steps`` with every detector of ``artifacts.ttc`` watching."""
    chain, f4 = models.pipelines[models.generator_experts].chain, models.f4
    methods = settings.artifacts.ttc.detectors
    recorders = []

    def callback_for(idx, grid):
        recorders.append(watching_recorder(chain, settings, {"asced", *methods}))
        return recorders[-1]

    images = build_sources(settings, seeds, ["generator"], models, generator_callback_for=callback_for)[
        "generator"].inputs
    parts = {m: [detect_from_recorder(m, rec, chain, f4, settings) for rec in recorders] for m in methods}
    detections = {m: Detection(torch.cat([p.latent for p in ps]), torch.cat([p.pixel for p in ps]),
                               torch.cat([p.severity for p in ps]), m) for m, ps in parts.items()}
    dyn = [score_dynamics(rec.timesteps, rec.scores) for rec in recorders]
    results = check_batch(images)
    return Watched(images, np.array([not r.passed for r in results]),
                   torch.from_numpy(np.stack([r.violation_mask for r in results])), detections, dyn[0][0],
                   torch.cat([d for _, d in dyn], dim=1))


@torch.no_grad()
def corrected(models: Models, settings: BenchSettings, seeds: SplitSeeds, masks: Tensor) -> list[np.ndarray]:
    """The generator source again, image ``i``'s latent mask ``masks[i]`` ((n, h, w) bool) corrected by TTC at
    ``T_c`` (:func:`refiner.bench.artifacts.generate_with_ttc`'s correction noise): with a detector's masks from
    :func:`watch` this *is* generation with TTC, since the trajectories agree until ``T_c``."""
    chain = models.pipelines[models.generator_experts].chain
    a = settings.artifacts.ttc

    def callback_for(idx, grid):
        return TrajectoryCorrection(grid, chain.alphas_cumprod, lambda: masks[idx], a.t_correct, gamma=float(a.gamma),
                                    correction_eta=float(a.correction_eta),
                                    parameterization=chain.experts[0].weights.parameterization,
                                    generator=correction_noise(seeds, idx))

    return build_sources(settings, seeds, ["generator"], models, generator_callback_for=callback_for)[
        "generator"].inputs


def random_masks(masks: Tensor, seed: int) -> Tensor:
    """For each (h, w) mask, as many latent pixels chosen uniformly at random (image ``i`` from ``seed + i``)."""
    out = torch.zeros_like(masks, dtype=torch.bool)
    for i, m in enumerate(masks):
        k = int(m.sum())
        chosen = torch.randperm(m.numel(), generator=torch.Generator().manual_seed(seed + i))[:k]
        out[i].view(-1)[chosen] = True
    return out


# ------------------------------------------------------------------------------------------------ statistics
def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of ``scores`` for ``positive`` (scikit-learn's, exact on the raw scores; torchmetrics' binary AUROC
    squashes scores outside [0, 1] through a float32 sigmoid, which ties large severities); nan when one class is
    absent."""
    positive = np.asarray(positive, bool)
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, np.asarray(scores, np.float64)))


def best_threshold(severity: np.ndarray, broken: np.ndarray) -> float:
    """The threshold ``c`` maximising the balanced accuracy of ``severity > c`` for ``broken`` (Youden's J); ties go
    to the smallest ``c``. Candidates: below the smallest value and every observed value."""
    severity, broken = np.asarray(severity, np.float64), np.asarray(broken, bool)
    candidates = np.concatenate([[severity.min() - 1.0], np.unique(severity)])
    flagged = severity[None, :] > candidates[:, None]
    tpr = (flagged & broken).sum(1) / max(broken.sum(), 1)
    tnr = (~flagged & ~broken).sum(1) / max((~broken).sum(), 1)
    return float(candidates[int(np.argmax(tpr + tnr))])


def _classification(flagged: np.ndarray, broken: np.ndarray) -> dict:
    tp, fp = (flagged & broken).sum(), (flagged & ~broken).sum()
    fn, tn = (~flagged & broken).sum(), (~flagged & ~broken).sum()
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {"accuracy": (tp + tn) / len(broken), "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn),
            "balanced_accuracy": (ratio(tp, tp + fn) + ratio(tn, tn + fp)) / 2}


def _percentiles(draws: list[float]) -> dict:
    """The 95% percentile interval of the defined draws (nan when none is)."""
    values = np.asarray(draws, np.float64)
    values = values[~np.isnan(values)]
    low, high = np.percentile(values, [2.5, 97.5]) if values.size else (float("nan"),) * 2
    return {"low": float(low), "high": float(high)}


def image_detection(severity: np.ndarray, broken: np.ndarray, threshold: float, resamples: int = RESAMPLES,
                    seed: int = 0) -> dict:
    """Image-level detection of ``broken`` by ``severity > threshold``: accuracy, balanced accuracy, precision,
    recall and the ROC AUC of the severity, each ``{"mean", "low", "high"}`` with the 95% percentile interval of
    ``resamples`` bootstrap draws over images (draws without both classes are skipped for the AUC and the balanced
    accuracy); ``majority_accuracy`` is the accuracy of always answering the commoner class."""
    severity, broken = np.asarray(severity, np.float64), np.asarray(broken, bool)
    point = {**_classification(severity > threshold, broken), "auc": auroc(severity, broken)}
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in point}
    for _ in range(resamples):
        i = rng.integers(0, len(broken), len(broken))
        for k, v in {**_classification(severity[i] > threshold, broken[i]), "auc": auroc(severity[i], broken[i])
                     }.items():
            draws[k].append(v)
    out = {k: {"mean": float(v), **_percentiles(draws[k])} for k, v in point.items()}
    return {**out, "threshold": threshold, "majority_accuracy": float(max(broken.mean(), 1 - broken.mean())),
            "broken": int(broken.sum()), "n": int(len(broken))}


def score_trap(w: Watched, factor: int) -> dict:
    """The paper's statistic in three groups of latent pixels (:data:`GROUPS`; a latent pixel is in a violation
    region when any pixel it covers is): quantiles of each pixel's mean change over the bank, the median change at
    each bank step, and the pixel ROC AUCs of violation regions against well-formed samples and against the rest of
    the broken samples."""
    violation = latent_from_pixel(w.violation, factor)
    broken = torch.from_numpy(w.broken)
    selects = (violation & broken[:, None, None], ~violation & broken[:, None, None],
               (~broken)[:, None, None].expand_as(violation))
    per_pixel = w.changes.mean(0)
    out = {"bank_t": w.bank_t, "groups": {}}
    for name, sel in zip(GROUPS, selects):
        values = per_pixel[sel].double().numpy()
        out["groups"][name] = {
            "pixels": int(values.size),
            "quantiles": dict(zip(("q10", "q25", "median", "q75", "q90"),
                                  np.quantile(values, [.1, .25, .5, .75, .9]).tolist())) if values.size else {},
            "median_per_step": [float(d[sel].median()) if sel.any() else None for d in w.changes],
            "values": values}
    vals = [out["groups"][g]["values"] for g in GROUPS]
    for key, other in (("auc_violation_vs_well_formed", vals[2]), ("auc_violation_vs_rest_of_broken", vals[1])):
        out[key] = auroc(np.concatenate([vals[0], other]), np.r_[np.ones(len(vals[0])), np.zeros(len(other))])
    return out


def rate_difference(broken: np.ndarray, baseline: np.ndarray) -> dict:
    est = two_level_bootstrap(broken[None].astype(float), baseline[None].astype(float))
    return {"mean": est.mean, "low": est.low, "high": est.high, "verdict": est.verdict()}


def rate(broken: np.ndarray) -> dict:
    est = two_level_bootstrap(broken[None].astype(float))
    return {"mean": est.mean, "low": est.low, "high": est.high}


# ------------------------------------------------------------------------------------------------ the study
def generation_row(label: str, images, plain, plain_broken, references, settings, evals: int, **extra) -> dict:
    scored = score(images, plain, references, swd_kwargs=settings.swd.kwargs())
    broken = np.zeros(len(images), bool)
    broken[scored["failed"]] = True
    return {"method": label, "unet_evals": evals, "artifact_rate": rate(broken),
            "minus_plain": rate_difference(broken, plain_broken), "swd_x1e3": scored["swd_x1e3"],
            "rmse_to_plain": scored["rmse_to_input"], **extra}


def one_nfe(models: Models, settings: BenchSettings, chain_experts, nfe: int, references) -> tuple[dict, dict]:
    s = with_steps(settings, nfe)
    a, f4 = s.artifacts.ttc, int(models.f4.factor)
    t0 = time.perf_counter()
    calibration = watch(models, s, s.seeds[s.asced.calibration_split])
    report = (calibration if s.asced.calibration_split == s.split else watch(models, s, s.split_seeds))
    log.info("NFE %d: watched generation in %.1f s", nfe, time.perf_counter() - t0)
    detection = {}
    for m, det in report.detections.items():
        threshold = best_threshold(calibration.detections[m].severity.numpy(), calibration.broken)
        detection[m] = {"image": image_detection(det.severity.numpy(), report.broken, threshold, seed=s.seed),
                        "pixel": mask_scores(det.pixel, report.violation),
                        "flagged_area": float(det.area.mean())}
    trap = score_trap(report, f4)
    plain, plain_broken = report.images, report.broken
    rows = [generation_row(f"plain, {nfe} DDIM steps", plain, plain, plain_broken, references, s, nfe)]
    for m, det in report.detections.items():
        masks = {m: det.latent}
        if s.asced.random_masks:
            masks[f"random mask of {m}'s area"] = random_masks(det.latent, s.seed + 1000)
        for label, mask in masks.items():
            images = corrected(models, s, s.split_seeds, mask)
            rows.append(generation_row(f"TTC at {a.t_correct}, {label}", images, plain, plain_broken, references, s,
                                       nfe, masked_latent=float(mask.float().mean())))
            log.info("NFE %d: %s", nfe, rows[-1]["method"])
    below = sum(t <= a.t_correct for t in generation_grid(nfe))
    for steps in sorted({below, steps_for(a.t_correct, s.t_per_step)}):
        refined = refine_all(models.pipelines[chain_experts], plain, a.t_correct, s, steps=steps)
        rows.append(generation_row(f"the chain on the plain samples from {a.t_correct}, {steps} steps", refined,
                                   plain, plain_broken, references, s, nfe + steps, added_evals=steps))
    section = {"nfe": nfe, "grid_below_t_correct": below, "detection": detection, "generation": rows,
               "score_trap": {k: v for k, v in trap.items() if k != "groups"} | {
                   "groups": {g: {k: v for k, v in d.items() if k != "values"} for g, d in trap["groups"].items()}},
               "calibration_in_sample": s.asced.calibration_split == s.split}
    return section, {g: d["values"] for g, d in trap["groups"].items()}


def run(settings: BenchSettings) -> dict:
    """The study of the module docstring on ``settings``; writes its outputs into ``settings.output_dir`` and returns
    ``asced.json``'s content."""
    s = settings
    out_dir = Path(s.output_dir)
    check_output_dir(out_dir, s.overwrite, OUTPUT_FILES, OUTPUT_FILES[0], WRITTEN_BY, "this command")
    check_bank(s)
    chain_spec = chain_method(s, [s.artifacts.ttc.t_correct])
    models = Models(s, [chain_spec], ["generator"])  # loads; refuses a generator that is not one full-range model
    references = clean_heads(s.n, s.split_seeds.references, s.size)
    res = {"written_by": WRITTEN_BY, "split": s.split, "seeds": to_plain(s.split_seeds),
           "calibration_split": s.asced.calibration_split, "n": s.n, "size": s.size,
           "generator": list(s.generator.experts), "chain": list(chain_spec.experts), "ttc": to_plain(s.artifacts.ttc),
           "refine_seed": s.seed, "by_nfe": []}
    values = {}
    for nfe in s.asced.nfe:
        section, values[nfe] = one_nfe(models, s, chain_spec.experts, nfe, references)
        res["by_nfe"].append(section)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "asced.json", json.dumps(_json_ready(res), indent=2) + "\n")
    atomic_write_text(out_dir / "asced.md", markdown(res))
    atomic_write_bytes(out_dir / "asced_score_trap.png", score_trap_png(res, values))
    return res


# ------------------------------------------------------------------------------------------------ reports
def _ci(d: dict, pct: bool = True) -> str:
    k = 100 if pct else 1
    fmt = "{:.1f}" if pct else "{:.3f}"
    if d["mean"] != d["mean"]:
        return "–"
    return f"{fmt.format(k * d['mean'])} [{fmt.format(k * d['low'])}, {fmt.format(k * d['high'])}]"


def markdown(res: dict) -> str:
    lines = [f"# ASCED at its own operating point: split `{res['split']}`, {res['n']} samples per NFE", "",
             f"Generator `{res['generator'][0]}`; chain {res['chain']}; TTC {res['ttc']}. Image-level thresholds "
             f"fixed on split `{res['calibration_split']}`. Intervals: 95% bootstrap over images.", ""]
    for sec in res["by_nfe"]:
        lines += [f"## NFE {sec['nfe']} ({sec['grid_below_t_correct']} grid points at or below t_correct)", "",
                  "| detector | image ROC AUC | accuracy (majority rule) | balanced accuracy | precision | recall "
                  "| pixel IoU / precision / recall | flagged area |", "|---|---|---|---|---|---|---|---|"]
        for m, d in sec["detection"].items():
            im, px = d["image"], d["pixel"]
            lines.append(f"| `{m}` | {_ci(im['auc'], False)} | {_ci(im['accuracy'])} "
                         f"({100 * im['majority_accuracy']:.1f}) | {_ci(im['balanced_accuracy'])} "
                         f"| {_ci(im['precision'])} | {_ci(im['recall'])} "
                         f"| {px['pixel_iou']:.3f} / {px['pixel_precision']:.3f} / {px['pixel_recall']:.3f} "
                         f"| {100 * d['flagged_area']:.1f}% |")
        st = sec["score_trap"]
        lines += ["", f"Score trap (mean weighted-score change per latent pixel over the bank, t = {st['bank_t']}): "
                  f"pixel ROC AUC violation regions vs well-formed samples {st['auc_violation_vs_well_formed']:.3f}, "
                  f"vs the rest of broken samples {st['auc_violation_vs_rest_of_broken']:.3f}.", "",
                  "| pixels in | count | q10 | median | q90 |", "|---|---|---|---|---|"]
        for g, d in st["groups"].items():
            q = d["quantiles"]
            q10, median, q90 = (q.get(k, float("nan")) for k in ("q10", "median", "q90"))
            lines.append(f"| {g} | {d['pixels']} | {q10:.3f} | {median:.3f} | {q90:.3f} |")
        lines += ["", "| generation | UNet evals/image | artifact rate | minus plain | SWD x1e3 | RMSE to plain "
                  "| masked latent |", "|---|---|---|---|---|---|---|"]
        for r in sec["generation"]:
            diff = r["minus_plain"]
            masked = f"{100 * r['masked_latent']:.1f}%" if "masked_latent" in r else ""
            lines.append(f"| {r['method']} | {r['unet_evals']} | {_ci(r['artifact_rate'])} | "
                         f"{_ci(diff)} {diff['verdict'] if diff['high'] > diff['low'] else ''} | {r['swd_x1e3']:.1f} | "
                         f"{r['rmse_to_plain']:.3f} | {masked} |")
        lines.append("")
    return "\n".join(lines)


def score_trap_png(res: dict, values: dict) -> bytes:
    plt = _pyplot()
    rows = len(res["by_nfe"])
    fig, axes = plt.subplots(rows, 2, figsize=(10, 3.6 * rows), squeeze=False)
    for (ax_hist, ax_step), sec in zip(axes, res["by_nfe"]):
        nfe = sec["nfe"]
        for g in GROUPS:
            v = values[nfe][g]
            if v.size:
                ax_hist.hist(np.log10(np.maximum(v, 1e-6)), bins=60, density=True, histtype="step", label=g)
            ax_step.plot(sec["score_trap"]["bank_t"], sec["score_trap"]["groups"][g]["median_per_step"], marker="o",
                         label=g)
        ax_hist.set(xlabel="log10 mean weighted-score change over the bank (per latent pixel)", ylabel="density",
                    title=f"NFE {nfe}: the score-trap statistic")
        ax_step.set(xlabel="t (later step of the change)", ylabel="median change", yscale="log",
                    title=f"NFE {nfe}: per bank step")
        ax_step.invert_xaxis()
        ax_hist.legend(fontsize=7)
    fig.tight_layout()
    return _figure_png(fig)

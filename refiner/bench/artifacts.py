"""Detection and targeted correction on the composition benchmark: ``python -m refiner.bench.artifacts [overrides]``
(``conf/bench.yaml``, its ``artifacts`` group; the same seeds, sources, checkpoints and scoring as the benchmark).

1. **Detection in input images** (ASCED's setting (b), :func:`refiner.artifacts.probe.probe_detect`): every
   detector's masks on the ``defects`` source against the injected defects' true masks, and on the ``generator``
   source against the checker's violation masks (:func:`refiner.artifacts.detect.mask_scores`).
2. **Detection during generation** (ASCED's own setting (a)): the benchmark's weak generator sampled again from the
   *same* noise with a detector watching and TTC correcting at ``t_correct``
   (:class:`refiner.artifacts.correct.TrajectoryCorrection`); its artifact rate against the plain samples'.
3. **Adaptive strength in refinement**: the chain at fixed t_starts, with ``t_start=auto`` (each image's start from
   its residual severity through the isotonic map; fitted and saved as ``t_start_auto.json`` on ``split=tune``,
   loaded from ``artifacts.calibration`` on any other split) and with region strength maps (flagged pixels start at
   the probe's t_start, the others at ``strength_t_low``; the residual mask grown by ``strength_dilate_px``), as points of artifact rate vs RMSE to the input.
   The UNet evaluations per image are reported with each point (the probe's included).

Writes ``artifacts.json``, ``artifacts.md`` and ``artifacts_tradeoff.png`` into ``output_dir``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from refiner.artifacts.composite import change_config, changed_region, paste_back, paste_weights
from refiner.artifacts.correct import AutoStart, TrajectoryCorrection, fit_auto_start, starts_from_strength
from refiner.artifacts.detect import (Detection, asced_paper_mask, dilate, mask_scores,
                                      pixel_change_mask, pixel_from_latent)
from refiner.artifacts.dynamics import StepRecorder, chain_callbacks
from refiner.artifacts.probe import probe_detect, probe_t_end
from refiner.bench.checker import check_batch
from refiner.bench.methods import BenchError, Method, score, steps_for
from refiner.bench.run import Models, _check_settings, build_sources, check_output_dir, refine_all
from refiner.bench.sources import clean_heads
from refiner.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

WRITTEN_BY = "refiner bench.artifacts"
OUTPUT_FILES = ("artifacts.json", "artifacts.md", "artifacts_tradeoff.png", "t_start_auto.json")


def _batches(n: int, size: int):
    return [list(range(k, min(n, k + size))) for k in range(0, n, size)]


def _detect_all(pipe, images, method: str, t_start: int, steps: int, cfg) -> Detection:
    parts = [probe_detect(pipe, [images[i] for i in idx], method, t_start, steps, seed=cfg.seed, indices=idx)
             for idx in _batches(len(images), cfg.batch_size)]
    return Detection(torch.cat([p.latent for p in parts]), torch.cat([p.pixel for p in parts]),
                     torch.cat([p.severity for p in parts]), method)


# ------------------------------------------------------------------------------------------- 1. detection
def detection_quality(pipe, sets, cfg, probe_steps: int) -> tuple[dict, dict]:
    out, detections = {}, {}
    for name, art in sets.items():
        if name == "defects":
            truth = torch.from_numpy(np.stack(art.masks)).bool()
        else:
            truth = torch.from_numpy(np.stack([r.violation_mask for r in check_batch(art.inputs)]))
        for method in cfg.artifacts.detectors:
            t0 = time.perf_counter()
            det = _detect_all(pipe, art.inputs, method, cfg.artifacts.probe_t_start, probe_steps, cfg)
            seconds = time.perf_counter() - t0
            out.setdefault(name, {})[method] = {**mask_scores(det.pixel, truth), "seconds": round(seconds, 2),
                                                "truth": "injected masks" if name == "defects" else "checker"}
            if art.clean is not None:  # the same heads without their defect: image-level false alarms
                clean = _detect_all(pipe, art.clean, method, cfg.artifacts.probe_t_start, probe_steps, cfg)
                out[name][method]["clean_images_flagged"] = float(clean.pixel.flatten(1).any(1).float().mean())
                out[name][method]["clean_flagged_fraction"] = float(clean.area.mean())
            detections[(name, method)] = det
            log.info("detect %s / %s: pixel IoU %.3f (%.1f s)", name, method, out[name][method]["pixel_iou"], seconds)
    return out, detections


# ------------------------------------------------------------------------------------------- 2. generation + TTC
@torch.no_grad()
def generate_with_ttc(models: Models, cfg, seeds, method: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The generator source again (:func:`refiner.bench.run.build_sources`: same noise, seed + i), with ``method``
    watching each batch and TTC correcting; returns the images and each image's latent mask."""
    chain, f4 = models.pipelines[models.generator_stages].chain, models.f4
    param, a = chain.stages[0].weights.parameterization, cfg.artifacts.ttc
    side = cfg.size // f4.factor
    corrections: list[tuple[int, TrajectoryCorrection]] = []

    def callback_for(idx: list[int], grid: list[int]):
        rec = StepRecorder(chain.alphas_cumprod, param, t_low=a.t_correct, t_high=a.t_detect,
                           keep_scores=method == "asced", keep_x0=method != "asced")

        def mask_fn():
            if method == "asced":
                return asced_paper_mask(rec.timesteps, rec.scores, t_correct=a.t_correct, t_detect=a.t_detect,
                                        factor=f4.factor).latent
            decoded = [f4.decode(z / chain.scale_factor).clamp(-1, 1) for z in rec.x0]
            return pixel_change_mask(decoded, factor=f4.factor).latent

        ttc = TrajectoryCorrection(grid, chain.alphas_cumprod, mask_fn, a.t_correct, gamma=float(a.gamma),
                                   correction_eta=float(a.correction_eta), parameterization=param,
                                   generator=torch.Generator().manual_seed(seeds["generator"] + idx[0] + 7))
        corrections.append((len(idx), ttc))
        return chain_callbacks([rec, ttc])

    images = build_sources(cfg, seeds, ["generator"], models, generator_callback_for=callback_for)["generator"].inputs
    masks = [m for count, ttc in corrections
             for m in (list(ttc.mask[:, 0].bool().cpu().numpy()) if ttc.mask is not None
                       else [np.zeros((side, side), dtype=bool)] * count)]
    return images, masks


# ------------------------------------------------------------------------------------------- 3. adaptive strength
def _needed_t(pipe, images, t_starts, cfg) -> tuple[np.ndarray, dict]:
    """Per image, the smallest swept t_start whose refinement passes the checker (the largest when none does); also
    the fixed-t outputs, reused as the sweep's points."""
    outputs = {t: refine_all(pipe, images, t, cfg) for t in t_starts}
    passed = {t: [r.passed for r in check_batch(outs)] for t, outs in outputs.items()}
    needed = [next((t for t in sorted(t_starts) if passed[t][i]), max(t_starts)) for i in range(len(images))]
    return np.asarray(needed, dtype=float), outputs


def _paste_rows(art, base: list[np.ndarray], regions: dict, settings, unet_evals: dict, label: str, references
                ) -> list[dict]:
    """Paste-back points (:mod:`refiner.artifacts.composite`): ``base`` (the refined images) kept only inside each
    region of ``regions`` ({name: Detection}), grown by ``dilate_px`` and feathered by ``feather_px``; images whose
    severity exceeds ``whole_above`` keep their whole refinement."""
    rows = []
    for region_name, det in regions.items():
        for grow in settings.dilate_px:
            grown = dilate(det.pixel, int(grow)).float()
            for px in settings.feather_px:
                for above in settings.whole_above:
                    weights = paste_weights(grown, int(px), det.severity, None if above is None else float(above))
                    outs = paste_back(base, art.inputs, weights)
                    whole = "" if above is None else f", whole image above severity {above}"
                    rows.append({"point": f"paste back ({label}; {region_name} mask, grow {grow}, feather {px}"
                                          f"{whole})", "unet_evals": unet_evals[region_name],
                                 "pasted_fraction": float(weights.mean()),
                                 "whole_images": int((weights.flatten(1) == 1).all(1).sum()),
                                 **score(outs, art.inputs, references, art.clean)})
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


def adaptive_points(pipe, sets, detections, cfg, out_dir: Path, probe_steps: int, references) -> tuple[dict, dict]:
    """Section 3; ``detections[(source, "residual")]`` (from :func:`detection_quality`) gives the severities and masks.
    On ``split=tune`` the ``t_start=auto`` map is fitted first (on every source's needed starts) and its points are
    in-sample; other splits load it."""
    a, points, calibration = cfg.artifacts, {}, {}
    t_starts, top = list(a.t_starts), int(a.probe_t_start)
    factor, paste = int(pipe.f4.factor), a.paste_back
    fixed, needed = {}, {}
    for name in a.sources:
        needed[name], fixed[name] = _needed_t(pipe, sets[name].inputs, t_starts, cfg)
    if cfg.split == "tune":
        sev = np.concatenate([detections[(name, "residual")].severity.numpy() for name in a.sources])
        need = np.concatenate([needed[name] for name in a.sources])
        auto = fit_auto_start(sev.tolist(), need.tolist(), min(t_starts), max(t_starts),
                              chain={"stages": [str(s) for s in cfg.methods.chain.stages]},
                              source={"split": cfg.split, "seeds": dict(cfg.seeds[cfg.split]), "n": cfg.n,
                                      "sources": list(a.sources), "detector": "residual"})
        auto.save(out_dir / "t_start_auto.json")
    else:
        auto = AutoStart.load(a.calibration)
    probe_cost = probe_steps + steps_for(top, cfg.t_per_step)
    for name in a.sources:
        art = sets[name]
        rows = [{"point": f"fixed t_start {t}", "unet_evals": steps_for(t, cfg.t_per_step),
                 **score(fixed[name][t], art.inputs, references, art.clean)} for t in t_starts]
        det = detections[(name, "residual")]
        starts_i = auto(det.severity.numpy())
        starts = torch.tensor(starts_i)[:, None, None].expand(len(art.inputs), cfg.size, cfg.size)
        auto_outs = refine_all(pipe, art.inputs, max(starts_i), cfg, starts=starts)
        auto_cost = probe_steps + steps_for(max(starts_i), cfg.t_per_step)
        rows.append({"point": "t_start=auto (residual severity)" + (" [in-sample]" if cfg.split == "tune" else ""),
                     "mean_t_start": float(np.mean(starts_i)), "unet_evals": auto_cost,
                     **score(auto_outs, art.inputs, references, art.clean)})
        grows = list(a.strength_dilate_px) if OmegaConf.is_list(a.strength_dilate_px) else [a.strength_dilate_px]
        strength_outs = {}
        for grow in grows:
            flagged = dilate(det.pixel, int(grow)).float()
            for t_low in a.strength_t_low:
                starts = starts_from_strength(flagged, int(t_low), top)
                label = f"rest from {t_low}" if len(grows) == 1 else f"grown {grow}, rest from {t_low}"
                strength_outs[label] = refine_all(pipe, art.inputs, top, cfg, starts=starts)
                rows.append({"point": f"strength map (residual; {label})", "unet_evals": probe_cost,
                             **score(strength_outs[label], art.inputs, references, art.clean)})
        base = fixed[name][top] if top in fixed[name] else refine_all(pipe, art.inputs, top, cfg)
        one_pass = steps_for(top, cfg.t_per_step)
        regions = {"probe": det, "output": changed_region(art.inputs, base, factor=factor)}
        regions = {k: regions[k] for k in paste.regions}
        for level in paste.change_levels:
            regions[f"output change > {level}"] = changed_region(art.inputs, base, factor=factor,
                                                                 cfg=change_config(float(level)))
        costs = {k: probe_cost if k == "probe" else one_pass for k in regions}
        rows += _paste_rows(art, base, regions, paste, costs, f"fixed t_start {top}", references)
        if paste.also_adaptive:
            probe_only = {"probe": det}
            rows += _paste_rows(art, auto_outs, probe_only, paste, {"probe": auto_cost},
                                "t_start=auto", references)
            for label, outs in strength_outs.items():
                rows += _paste_rows(art, outs, probe_only, paste, {"probe": probe_cost}, f"strength map ({label})",
                                    references)
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


def tradeoff_png(res: dict) -> bytes:
    from refiner.bench.report import _figure_png, _pyplot

    plt = _pyplot()
    names = list(res["adaptive"])
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(5.2 * max(1, len(names)), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = res["adaptive"][name]["rows"]
        fixed = [r for r in rows if r["point"].startswith("fixed")]
        ax.plot([r["rmse_to_input"] for r in fixed], [r["artifact_rate"] for r in fixed], "o-", label="fixed t_start")
        for r in rows:
            if not r["point"].startswith("fixed"):
                marker = "P" if "paste back" in r["point"] else ("s" if "strength" in r["point"] else "*")
                ax.plot(r["rmse_to_input"], r["artifact_rate"], marker, markersize=9, label=r["point"])
        ax.set_xlabel("RMSE to input (lower = more faithful)")
        ax.set_ylabel("artifact rate (lower is better)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    return _figure_png(fig)


@torch.no_grad()
def run(cfg: DictConfig) -> dict:
    seeds, _ = _check_settings(cfg)
    out_dir = Path(cfg.output_dir)
    check_output_dir(out_dir, bool(cfg.overwrite), OUTPUT_FILES, OUTPUT_FILES[0], WRITTEN_BY, "this command")
    a = cfg.artifacts
    if cfg.split != "tune" and not Path(a.calibration).is_file():
        raise BenchError(f"artifacts.calibration {a.calibration} not found: run split=tune first (it writes "
                         "t_start_auto.json), or point artifacts.calibration at one")
    chain_method = Method("chain", "diffusion", tuple(a.t_starts), tuple(str(s) for s in cfg.methods.chain.stages))
    sources = ["generator", "defects"]
    models = Models(cfg, [chain_method], sources)
    pipe = models.pipelines[chain_method.stages]
    references = clean_heads(cfg.n, seeds["references"], cfg.size)
    sets = build_sources(cfg, seeds, sources, models)
    top = int(a.probe_t_start)
    probe_steps = steps_for(top - probe_t_end(pipe.chain, top), cfg.t_per_step)

    detection, detections = detection_quality(pipe, sets, cfg, probe_steps)
    generation = {}
    plain = sets["generator"].inputs
    plain_rate = np.mean([not r.passed for r in check_batch(plain)])
    for method in a.ttc.detectors:
        t0 = time.perf_counter()
        images, masks = generate_with_ttc(models, cfg, seeds, method)
        outside = ~pixel_from_latent(torch.from_numpy(np.stack(masks)).bool(), int(models.f4.factor))
        diff = torch.from_numpy(np.stack(images).astype(np.float32) - np.stack(plain).astype(np.float32)) / 255
        generation[method] = {"plain_artifact_rate": float(plain_rate),
                              "masked_fraction": float(1 - outside.float().mean()),
                              "rmse_outside_mask": float(diff[outside].pow(2).mean().sqrt()) if outside.any() else None,
                              "rmse_inside_mask": float(diff[~outside].pow(2).mean().sqrt()) if (~outside).any() else None,
                              "ttc_artifact_rate": float(np.mean([not r.passed for r in check_batch(images)])),
                              "changed": int(sum(not np.array_equal(p, q) for p, q in zip(plain, images))),
                              "seconds": round(time.perf_counter() - t0, 2)}
    adaptive, calibration = adaptive_points(pipe, sets, detections, cfg, out_dir, probe_steps, references)
    res = {"written_by": WRITTEN_BY, "split": cfg.split, "seeds": dict(seeds), "n": cfg.n, "size": cfg.size,
           "probe_t_start": top, "probe_steps": probe_steps, "settings": OmegaConf.to_container(a, resolve=True),
           "detection": detection, "generation": generation, "adaptive": adaptive, "calibration": calibration}
    out_dir.mkdir(parents=True, exist_ok=True)
    from refiner.bench.report import _json_ready

    atomic_write_text(out_dir / "artifacts.json", json.dumps(_json_ready(res), indent=2) + "\n")
    atomic_write_text(out_dir / "artifacts.md", markdown(res))
    atomic_write_bytes(out_dir / "artifacts_tradeoff.png", tradeoff_png(res))
    return res


if __name__ == "__main__":
    from refiner.apps.bench import artifacts_main

    artifacts_main()

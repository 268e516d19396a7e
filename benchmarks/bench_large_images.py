"""Row 10: large images: time and peak memory vs pixels, and seams of tiling vs whole.

Timing (10a) goes through refine.py's own path, :meth:`refiner.inference.pipeline.Pipeline.refine_images`
(batch 1, uint8 in and out): pad, VQ-f4 encode (demo, conf/first_stage/demo.yaml), two-expert
``Chain.refine()`` (two demo UNets, conf/model/refiner_tiny.yaml, windows [250, 500) and [0, 250),
t_start=499, DDIM), decode, crop, with ``Tiling(mode=auto)``: above ``--auto-above`` pixels (default
the pipeline's measured ``AUTO_ABOVE_PIXELS``) the first stage runs on overlapping pixel tiles
(``--vq-tile``/``--vq-overlap``) and every UNet through ``MultiDiffusion`` on jittered latent tiles
(``--latent-tile``/``--latent-stride``, ``--view-batch``). Weights are random: they do not change the cost.
Sizes: 256, 512, 1024, 2048 px (``--sizes`` adds 4096); tiled sizes up to ``--whole-up-to`` are also
timed with ``mode=never``. Encode and decode times are the summed time inside the VQ's ``encode`` /
``decode`` calls (tile blending and the uint8 conversions are counted as refine). Every time is measured twice:
wall clock and the process's CPU time (``time.process_time``). With ``--threads 1`` the CPU time is the work done,
and on a shared machine it is far steadier than the wall clock, which also counts the time the process waited for
a core. ``overlap`` is the tiles' processed pixels over the image's pixels (VQ tiles at image resolution,
MultiDiffusion tiles at latent resolution): the extra work that overlapping tiles cost by arithmetic. ``--crossover`` (10c) times ``mode=never`` and
``mode=always`` at 256, 384, 512, 640, 768 px: where tiling starts to pay, the source of ``AUTO_ABOVE_PIXELS``.
``--quick``: 128 and 256 px with the small seam tiles and 2 steps, a smoke run of every path. Each
size runs in a fresh subprocess after a warm-up on a 64 px image; peak memory is the peak resident size
during the timed call (``VmHWM`` after resetting it through ``/proc/self/clear_refs`` right before the call)
minus the resident size then, which already holds the models and the uint8 input image (torch allocations are
invisible to tracemalloc). ``--result-name`` names the JSON file (default ``bench_large_images``).
``--profile SIZE`` runs one timed call at SIZE px under cProfile and prints the top functions by own time.
``--baseline-root DIR`` also times another checkout's refiner (its ``Pipeline.refine_images`` with this script's
models and measurement) right before ours at every size: before/after ratios from one run. ``--repeat N`` times
every size N times, interleaved with the baseline, and keeps the run with the least CPU time (all runs are in
the JSON).

Seams, at sizes that fit whole (256 and 512 px; ``--quick``: 256): the same pipeline, same noise, once
whole, once with MultiDiffusion alone (latent 32 / stride 24, VQ whole) and once with both tiled (VQ
128 px / 32 overlap too). Reported: mean |tiled - whole| / mean |whole| of the VQ round trip, of the
refined latent and image with MultiDiffusion alone, and of the image with both; and ``seam_ratio``
(gradient across tile borders / beside them; about 1 = no seam) of the tiled images; and the VQ round trip's
PSNR to the photo, whole and tiled, which says whether the f4 can represent the photo at all (the demo f4 knows
only cartoon heads: ``scripts/f4_round_trip.py --mosaic`` measures tiled against whole on its own domain).
With random weights the differences are pessimistic (a trained autoencoder's GroupNorm statistics
vary less between tiles); ``--vq-ckpt`` measures the seams with a trained f4 of the demo.yaml shape
instead (loaded by ``refiner.formats.first_stage.build_first_stage``, e.g. the demo's
``outputs/demo/vq_f4/checkpoints/last.ckpt``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import common as C

SIZES = (256, 512, 1024, 2048)  # 4096: add it with --sizes (about 17 min for 10 steps here)
CROSSOVER_SIZES = (256, 384, 512, 640, 768)
QUICK_SIZES = (128, 256)  # with the small seam tiles, so every path (tiled, untiled, seams) runs
SEAM_SIZES = (256, 512)
SEAM_TILES = {"vq_tile": 128, "vq_overlap": 32, "latent_tile": 32, "latent_stride": 24}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 128 and 256 px with the small seam tiles, 2 steps, seams at 256 px")
    p.add_argument("--threads", type=int, default=C.THREADS)
    p.add_argument("--steps", type=int, default=10, help="DDIM steps over t in [0, 499]")
    p.add_argument("--sizes", default="", help="comma-separated image sides in px (default 256..4096)")
    p.add_argument("--vq-tile", type=int, default=256, help="first-stage tile, px")
    p.add_argument("--vq-overlap", type=int, default=32, help="first-stage tile overlap, px")
    p.add_argument("--latent-tile", type=int, default=64, help="MultiDiffusion tile, latent px")
    p.add_argument("--latent-stride", type=int, default=48, help="MultiDiffusion stride, latent px")
    p.add_argument("--view-batch", type=int, default=4, help="MultiDiffusion tiles per UNet call")
    p.add_argument("--auto-above", type=int, default=0,
                   help="tiling.auto_above_pixels (default: refiner.inference.pipeline.AUTO_ABOVE_PIXELS)")
    p.add_argument("--crossover", action="store_true",
                   help="only time mode=never vs mode=always at 256..768 px (where tiling starts to pay)")
    p.add_argument("--seams-only", action="store_true", help="only the seam table (10b), e.g. with --vq-ckpt")
    p.add_argument("--skip-seams", action="store_true", help="only the timing table (10a), e.g. for 4096 px")
    p.add_argument("--profile", type=int, default=0, metavar="SIZE",
                   help="only profile one timed run at SIZE px (cProfile, in this process): the top functions by own time")
    p.add_argument("--repeat", type=int, default=1,
                   help="time every size this many times (interleaved with the baseline); the table shows the run "
                        "with the least CPU time and the largest peak memory")
    p.add_argument("--baseline-root", default="",
                   help="another checkout (e.g. `git worktree add /tmp/base <commit>`): time its pipeline too, "
                        "right before ours at each size, in the same run (rows 'baseline')")
    p.add_argument("--whole-up-to", type=int, default=1024,
                   help="also time the untiled pipeline at sizes above the tiles up to this side (the crossover)")
    p.add_argument("--vq-ckpt", default="", help="trained demo-shaped f4 for the seam measurement")
    p.add_argument("--result-name", default="bench_large_images",
                   help="benchmarks/results/<name>.json of the timing run (e.g. bench_large_images_4096)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    return p.parse_args()


def rss_mb(field: str = "VmRSS") -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident since start or the last :func:`reset_peak`), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Reset ``VmHWM`` to the current resident size (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")


def overlap(size: int, tile: int, stride: int) -> float:
    """Processed pixels of square tiles over the pixels of a ``size x size`` image (1 if one tile covers it)."""
    from refiner.inference.tiling import tile_starts

    return (len(tile_starts(size, tile, stride)) * min(tile, size) / size) ** 2


def build_models(vq_ckpt: str = ""):
    from bench_sampler import build_chain

    if vq_ckpt:  # the project's loader: our Lightning first-stage checkpoints or CompVis/taming layouts
        from refiner.formats.first_stage import build_first_stage

        vq = build_first_stage(vq_ckpt, C.demo_vq_params(4)).eval()
    else:
        vq = C.build_vq(C.demo_vq_params(4))
    return vq, build_chain()


def smooth_photo(size: int):
    """A deterministic image in [-1, 1]: a demo photo resized to ``size`` (bicubic), so the content
    is natural at every size."""
    import torch
    import torch.nn.functional as F

    from refiner.data.demo import demo_photos

    photo = next(iter(demo_photos().values()))
    x = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 127.5 - 1
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def run_pipeline(vq, chain, x, steps: int, tiles: dict, seed: int = 0) -> dict:
    """encode -> refine -> decode, whole when the image fits the tiles; returns outputs and times."""
    import torch

    from refiner.inference.tiling import tiled_decode, tiled_encode

    out: dict = {}
    with torch.no_grad():
        t0 = time.perf_counter()
        z = tiled_encode(vq, x, tiles["vq_tile"], tiles["vq_overlap"])
        t1 = time.perf_counter()
        latent_tiled = max(z.shape[-2:]) > tiles["latent_tile"]
        multidiffusion = dict(tile=tiles["latent_tile"], stride=tiles["latent_stride"],
                              view_batch_size=tiles.get("view_batch", 16)) if latent_tiled else None
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
        z_ref = chain.refine(z, 499, steps, noise=noise, tiles=multidiffusion).latent
        t2 = time.perf_counter()
        img = tiled_decode(vq, z_ref, tiles["vq_tile"], tiles["vq_overlap"])
        t3 = time.perf_counter()
    out.update(z=z, z_ref=z_ref, img=img, encode_s=t1 - t0, refine_s=t2 - t1, decode_s=t3 - t2, total_s=t3 - t0,
               latent_tiled=latent_tiled)
    return out


def whole_tiles(size: int, factor: int = 4) -> dict:
    """Tile settings under which the library-level pipeline (:func:`run_pipeline`) runs untiled at ``size``."""
    return {"vq_tile": size, "vq_overlap": 0, "latent_tile": size // factor, "latent_stride": size // factor}


class _Timed:
    """Wraps a bound method and sums the wall-clock and CPU seconds spent in it."""

    def __init__(self, fn):
        self.fn, self.seconds, self.cpu_seconds = fn, 0.0, 0.0

    def __call__(self, *args, **kwargs):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0
            self.cpu_seconds += time.process_time() - c0


def pipeline_for(vq, chain, tiles: dict, mode: str, auto_above: int):
    from refiner.inference.pipeline import AUTO_ABOVE_PIXELS, Pipeline, Tiling

    tiling = Tiling(mode=mode, auto_above_pixels=auto_above or AUTO_ABOVE_PIXELS, f4_tile=tiles["vq_tile"],
                    f4_overlap=tiles["vq_overlap"], latent_tile=tiles["latent_tile"],
                    latent_stride=tiles["latent_stride"], view_batch_size=tiles.get("view_batch", 4))
    return Pipeline(vq, chain, tiling=tiling)


def worker_time(size: int, steps: int, tiles: dict, threads: int, mode: str = "auto", auto_above: int = 0,
                profiler=None) -> dict:
    """refine.py's path (Pipeline.refine_images) on one ``size`` x ``size`` photo, tiling ``mode``; ``profiler``
    (a ``cProfile.Profile``) watches the timed call only."""
    C.set_threads(threads)
    vq, chain = build_models()
    pipe = pipeline_for(vq, chain, tiles, mode, auto_above)
    image = to_uint8_image(smooth_photo(size))
    pipe.refine_images([to_uint8_image(smooth_photo(64))], 499, 2)  # warm-up
    vq.encode, vq.decode = _Timed(vq.encode), _Timed(vq.decode)
    gc.collect()
    base = rss_mb()
    reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    if profiler is not None:
        profiler.enable()
    pipe.refine_images([image], 499, steps, seed=0)
    if profiler is not None:
        profiler.disable()
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = rss_mb("VmHWM")
    tiled = pipe.tiled(size, size)
    vq_tiled, latent_tiled = tiled and size > tiles["vq_tile"], tiled and size // vq.factor > tiles["latent_tile"]
    return {"size": size, "pixels": size * size, "steps": steps, "mode": mode,
            "auto_above_pixels": pipe.tiling.auto_above_pixels, "vq_tiled": vq_tiled, "latent_tiled": latent_tiled,
            "vq_overlap": overlap(size, tiles["vq_tile"], tiles["vq_tile"] - tiles["vq_overlap"]) if vq_tiled else 1.0,
            "latent_overlap": overlap(size // vq.factor, tiles["latent_tile"], tiles["latent_stride"])
            if latent_tiled else 1.0,
            "encode_s": vq.encode.seconds, "decode_s": vq.decode.seconds,
            "refine_s": total - vq.encode.seconds - vq.decode.seconds, "total_s": total,
            "encode_cpu_s": vq.encode.cpu_seconds, "decode_cpu_s": vq.decode.cpu_seconds,
            "refine_cpu_s": cpu - vq.encode.cpu_seconds - vq.decode.cpu_seconds, "total_cpu_s": cpu,
            "base_rss_mb": base, "peak_rss_mb": peak, "peak_minus_base_mb": peak - base,
            "loadavg_1": os.getloadavg()[0], "refiner": str(Path(sys.modules["refiner"].__file__).parents[1])}


def to_uint8_image(x):
    from refiner.data.images import to_uint8

    return to_uint8(x[0])


def worker_seams(size: int, steps: int, threads: int, vq_ckpt: str) -> dict:
    import torch

    from refiner.inference.tiling import seam_ratio, tile_borders, tiled_decode, tiled_encode

    C.set_threads(threads)
    vq, chain = build_models(vq_ckpt)
    x = smooth_photo(size)
    whole = run_pipeline(vq, chain, x, steps, whole_tiles(size, vq.factor))
    tiled = run_pipeline(vq, chain, x, steps, SEAM_TILES)
    latent_only = {**SEAM_TILES, "vq_tile": size, "vq_overlap": 0}  # MultiDiffusion alone, whole VQ
    md = run_pipeline(vq, chain, x, steps, latent_only)

    def rel(a, b) -> float:
        return float((a - b).abs().mean() / b.abs().mean())

    def psnr(a, b) -> float:  # of the uint8 images, as saved
        mse = ((to_uint8_image(a).astype(float) - to_uint8_image(b)) ** 2).mean()
        return float(10 * math.log10(255**2 / mse)) if mse else math.inf

    with torch.no_grad():
        rt_whole = vq.decode(vq.encode(x))
        rt_tiled = tiled_decode(vq, tiled_encode(vq, x, SEAM_TILES["vq_tile"], SEAM_TILES["vq_overlap"]),
                                SEAM_TILES["vq_tile"], SEAM_TILES["vq_overlap"])
    vq_borders = tile_borders(size, SEAM_TILES["vq_tile"], SEAM_TILES["vq_tile"] - SEAM_TILES["vq_overlap"])
    md_borders = [b * vq.factor for b in tile_borders(size // vq.factor, SEAM_TILES["latent_tile"],
                                                       SEAM_TILES["latent_stride"])]
    return {
        "size": size, "steps": steps, "tiles": SEAM_TILES, "vq_weights": vq_ckpt or "random",
        "vq_round_trip_rel_diff": rel(rt_tiled, rt_whole),
        "vq_round_trip_psnr_whole": psnr(rt_whole, x), "vq_round_trip_psnr_tiled": psnr(rt_tiled, x),
        "encode_rel_diff": rel(tiled["z"], whole["z"]),
        "multidiffusion_latent_rel_diff": rel(md["z_ref"], whole["z_ref"]),
        "multidiffusion_image_rel_diff": rel(md["img"], whole["img"]),
        "image_rel_diff": rel(tiled["img"], whole["img"]),
        "image_mean_abs_diff": float((tiled["img"] - whole["img"]).abs().mean()),
        "seam_ratio_vq_borders": seam_ratio(tiled["img"], vq_borders, vq.factor),
        "seam_ratio_multidiffusion_only": seam_ratio(md["img"], md_borders, vq.factor),
        "seam_ratio_whole_at_vq_borders": seam_ratio(whole["img"], vq_borders, vq.factor),
    }


def run_sub(args: argparse.Namespace, job: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(job), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fastest(results: list[dict]) -> dict:
    """Of repeated runs of one variant, the one with the least CPU time (interference only ever adds time), with
    the peak memory of the worst run."""
    best = dict(min(results, key=lambda r: r["total_cpu_s"]))
    best["peak_minus_base_mb"] = max(r["peak_minus_base_mb"] for r in results)
    best["repeats"] = len(results)
    return best


def timing_row(label: str, r: dict, ref: dict) -> list:
    def per_px(key: str) -> str:
        return C.fmt((r[key] / r["pixels"]) / (ref[key] / ref["pixels"]), 2) if key in r and key in ref else "-"

    def cpu(key: str) -> str:
        return C.fmt(r[key]) if key in r else "-"

    return [label, C.fmt(r.get("vq_overlap", 1.0)) if r["vq_tiled"] else "no",
            C.fmt(r.get("latent_overlap", 1.0)) if r["latent_tiled"] else "no",
            f"{C.fmt(r['encode_s'])} / {cpu('encode_cpu_s')}", f"{C.fmt(r['refine_s'])} / {cpu('refine_cpu_s')}",
            f"{C.fmt(r['decode_s'])} / {cpu('decode_cpu_s')}", f"{C.fmt(r['total_s'])} / {cpu('total_cpu_s')}",
            f"{per_px('total_s')} / {per_px('total_cpu_s')}", f"{r['peak_minus_base_mb']:.0f}",
            C.fmt(r["loadavg_1"], 1) if "loadavg_1" in r else "-"]


TIMING_HEADER = ["image", "VQ tiled (overlap)", "latent tiled (overlap)", "encode s, wall / CPU", "refine s",
                 "decode s", "total s", "time/pixel rel. to first size, wall / CPU", "peak RSS - base, MB",
                 "load avg (1 min)"]


def crossover(args: argparse.Namespace, tiles: dict, steps: int) -> dict:
    """10c: mode=never vs mode=always, interleaved per size (both see the same machine load)."""
    rows, results = [], []
    for s in [int(x) for x in args.sizes.split(",") if x] or CROSSOVER_SIZES:
        pair = {m: run_sub(args, {"kind": "time", "size": s, "steps": steps, "tiles": tiles, "mode": m,
                                  "auto_above": args.auto_above}) for m in ("never", "always")}
        results.append(pair)
    ref = results[0]["never"]
    for pair in results:
        for m in ("never", "always"):
            rows.append(timing_row(f"{pair[m]['size']} px, {'whole' if m == 'never' else 'tiled'}", pair[m], ref))
    C.print_table(f"10c. Crossover: Pipeline.refine_images whole (tiling.mode=never) vs tiled (always), {steps} steps",
                  TIMING_HEADER, rows)
    payload = {"command": C.command("bench_large_images", args.quick) + " --crossover", "tiles": tiles,
               "steps": steps, "crossover": results}
    C.write_result("bench_large_images_crossover", payload)
    return payload


def profile(args: argparse.Namespace, tiles: dict, steps: int) -> dict:
    """Where the time goes: the timed call of one :func:`worker_time` run at ``--profile`` px under cProfile."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    result = worker_time(args.profile, steps, tiles, args.threads, "auto", args.auto_above, profiler)
    stats = pstats.Stats(profiler)
    total = sum(v[2] for v in stats.stats.values())  # own time of every function
    print(f"{args.profile} px, {steps} steps: {result['total_s']:.1f} s wall, {result['total_cpu_s']:.1f} s CPU")
    for (file, line, name), v in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:25]:
        print(f"{v[2]:9.2f} s {100 * v[2] / total:5.1f}%  {v[1]:7d} calls  {Path(file).name}:{line}({name})")
    return result


def main() -> dict:
    args = parse_args()
    if args.worker:
        job = json.loads(args.worker)
        if job.get("root"):  # time another checkout's refiner (--baseline-root): import it instead of ours
            sys.path.insert(0, job["root"])
            for name in [m for m in sys.modules if m == "refiner" or m.startswith("refiner.")]:
                del sys.modules[name]  # common.py imported ours already
        if job["kind"] == "time":
            result = worker_time(job["size"], job["steps"], job["tiles"], args.threads, job.get("mode", "auto"),
                                 job.get("auto_above", 0))
        else:
            result = worker_seams(job["size"], job["steps"], args.threads, job["vq_ckpt"])
        print(json.dumps(result))
        return result
    steps = 2 if args.quick else args.steps
    tiles = {"vq_tile": args.vq_tile, "vq_overlap": args.vq_overlap, "latent_tile": args.latent_tile,
             "latent_stride": args.latent_stride, "view_batch": args.view_batch}
    if args.quick:
        tiles.update(SEAM_TILES)
    if args.profile:
        return profile(args, tiles, steps)
    if args.crossover:
        return crossover(args, tiles, steps)
    if args.seams_only:
        return seam_table(args, steps)
    sizes = [int(s) for s in args.sizes.split(",") if s] or list(QUICK_SIZES if args.quick else SIZES)
    auto_above = args.auto_above or (128 * 128 if args.quick else 0)
    timing, untiled, baseline, runs = [], [], [], []
    for s in sizes:  # the whole variant right after the tiled one, so both see the same machine load
        job = {"kind": "time", "size": s, "steps": steps, "tiles": tiles, "mode": "auto", "auto_above": auto_above}
        mine, theirs = [], []
        for _ in range(args.repeat):  # interleaved: baseline, ours, baseline, ours, ...
            if args.baseline_root:  # the other checkout just before ours, same load
                theirs.append(run_sub(args, {**job, "root": str(Path(args.baseline_root).resolve())}))
            mine.append(run_sub(args, job))
        runs += mine + theirs
        timing.append(fastest(mine))
        if theirs:
            baseline.append(fastest(theirs))
        if (timing[-1]["vq_tiled"] or timing[-1]["latent_tiled"]) and s <= args.whole_up_to:
            untiled.append(run_sub(args, {"kind": "time", "size": s, "steps": steps, "tiles": tiles, "mode": "never"}))
    ref = timing[0]
    rows = [timing_row(f"{r['size']} px", r, ref) for r in timing] + [
        timing_row(f"{r['size']} px, untiled", r, ref) for r in untiled] + [
        timing_row(f"{r['size']} px, baseline", r, ref) for r in baseline]
    C.print_table(f"10a. Large images: Pipeline.refine_images, tiling auto (above {timing[0]['auto_above_pixels']} "
                  f"px), two-expert refine ({steps} steps), batch 1", TIMING_HEADER, rows)
    payload = {"command": " ".join(["python benchmarks/bench_large_images.py", *sys.argv[1:]]), "tiles": tiles,
               "steps": steps, "auto_above_pixels": timing[0]["auto_above_pixels"], "timing": timing,
               "untiled": untiled, "baseline_root": args.baseline_root, "baseline": baseline, "repeat": args.repeat,
               "all_runs": runs,
               **({} if args.skip_seams else seam_table(args, steps))}
    C.write_result(args.result_name, payload)
    return payload


def seam_table(args: argparse.Namespace, steps: int) -> dict:
    """10b: tiled vs whole at sizes that fit whole; returns ``{"seams": [...]}`` (written alone with --seams-only)."""
    seams = [run_sub(args, {"kind": "seams", "size": s, "steps": steps, "vq_ckpt": args.vq_ckpt})
             for s in (SEAM_SIZES[:1] if args.quick else SEAM_SIZES)]
    srows = [[f"{s['size']} px", s["vq_weights"] if s["vq_weights"] == "random" else "trained",
              C.fmt(s["vq_round_trip_rel_diff"], 3), C.fmt(s["multidiffusion_latent_rel_diff"], 4),
              C.fmt(s["multidiffusion_image_rel_diff"], 4), C.fmt(s["image_rel_diff"], 3),
              C.fmt(s["seam_ratio_vq_borders"], 2), C.fmt(s["seam_ratio_multidiffusion_only"], 2),
              C.fmt(s["seam_ratio_whole_at_vq_borders"], 2),
              f"{C.fmt(s['vq_round_trip_psnr_whole'])} / {C.fmt(s['vq_round_trip_psnr_tiled'])}"] for s in seams]
    C.print_table("10b. Seams: tiled (VQ 128/32 px, latent 32/24) vs whole, same noise; rel. diff = "
                  "mean |tiled - whole| / mean |whole|; seam ratio = gradient across tile borders / beside them",
                  ["image", "VQ weights", "VQ round trip rel. diff", "MultiDiffusion latent rel. diff",
                   "MultiDiffusion image rel. diff", "both tiled, image rel. diff", "seam ratio, VQ borders",
                   "seam ratio, MultiDiffusion borders", "whole image at VQ borders",
                   "VQ round trip PSNR to the photo, whole / tiled, dB"], srows)
    if args.seams_only:  # its own file unless --result-name names one
        name = "bench_large_images_seams" if args.result_name == "bench_large_images" else args.result_name
        C.write_result(name, {"command": C.command("bench_large_images", args.quick)
                                                    + " --seams-only" + (" --vq-ckpt ..." if args.vq_ckpt else ""),
                                                    "steps": steps, "seams": seams})
    return {"seams": seams}


if __name__ == "__main__":
    main()

"""Row 7: cost vs image size: two-expert ``Chain.refine()`` with the demo UNet, and VQ-f4 encode + decode.

Image sizes 256, 512, 1024 px -> f4 latents 64, 128, 256 (batch 1). ``Chain.refine`` runs two experts
(windows [250, 500) and [0, 250), t_start=499) for 10 and 25 DDIM steps (best of 2 runs each). Every (workload, size)
runs in a fresh subprocess; peak memory is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the
end minus the resident size after building the models (torch allocations are invisible to
tracemalloc). Each subprocess does one short warm-up call (same shapes) before timing.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import common as C

SIZES = (256, 512, 1024)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(kind: str, size: int, steps: list[int], threads: int) -> dict:
    import torch

    C.set_threads(threads)
    out: dict = {"kind": kind, "size": size}
    if kind == "refine":
        from bench_sampler import build_chain

        chain = build_chain()
        z = torch.randn(1, 3, size // 4, size // 4)
        base = rss_mb()
        chain.refine(z, 499, 2)  # warm-up
        for s in steps:  # best of 2: interference from other jobs only ever adds time
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                chain.refine(z, 499, s)
                times.append(time.perf_counter() - t0)
            out[f"steps_{s}_s"] = min(times)
    else:
        vq = C.build_vq(C.demo_vq_params(4))
        x = torch.rand(1, 3, size, size) * 2 - 1
        base = rss_mb()
        with torch.no_grad():
            vq.decode(vq.encode(x[..., :64, :64]))  # warm-up (small)
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                vq.decode(vq.encode(x))
                times.append(time.perf_counter() - t0)
        out["encode_decode_s"] = min(times)
    out["base_rss_mb"] = base
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["peak_minus_base_mb"] = out["peak_rss_mb"] - base
    return out


def run_sub(kind: str, size: int, steps: list[int], threads: int) -> dict:
    # VQModel's mid-block attention runs through SDPA (refiner.models.vq.SDPAAttnBlock), so no (HW)^2
    # score matrix is built; before that swap, 1024 px needed ~32 GiB and was skipped here.
    cmd = [sys.executable, __file__, "--worker", kind, str(size), ",".join(map(str, steps)), str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> dict:
    args = C.parse_args(__doc__.splitlines()[0])
    steps = [10] if args.quick else [10, 25]
    results = {"refine": [], "vq": []}
    for size in SIZES:  # alternate the two workloads per size
        results["refine"].append(run_sub("refine", size, steps, args.threads))
        results["vq"].append(run_sub("vq", size, steps, args.threads))
    rows = []
    ref = results["refine"][0]
    for r in results["refine"]:
        cells = [f"refine, {r['size']} px (latent {r['size'] // 4})"]
        for s in steps:
            cells += [C.fmt(r[f"steps_{s}_s"], 2), C.fmt(r[f"steps_{s}_s"] / ref[f"steps_{s}_s"], 1)]
        cells += [f"{r['peak_minus_base_mb']:.0f}"]
        rows.append(cells)
    header = ["workload"] + sum([[f"{s} steps s", f"{s} steps x 256px"] for s in steps], []) + ["peak RSS - base, MB"]
    C.print_table("7a. Two-expert refine() cost vs image size (batch 1, demo UNet)", header, rows)
    vref = results["vq"][0]["encode_decode_s"]
    vrows = [[f"{v['size']} px", C.fmt(v["encode_decode_s"], 2), C.fmt(v["encode_decode_s"] / vref, 1),
              f"{v['peak_minus_base_mb']:.0f}"] if "skipped" not in v else [f"{v['size']} px", "not run", "-",
              v["skipped"]] for v in results["vq"]]
    C.print_table("7b. VQ-f4 (demo, ch 32) encode + decode vs image size (batch 1, best of 2)",
                  ["image", "seconds", "x 256px", "peak RSS - base, MB"], vrows)
    C.write_result("bench_scaling", {"command": C.command("bench_scaling", args.quick), **results})
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, kind, size, steps, threads = sys.argv
        print(json.dumps(worker(kind, int(size), [int(s) for s in steps.split(",")], int(threads))))
    else:
        main()

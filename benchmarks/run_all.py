"""Run every benchmark (each in a fresh subprocess) and collect the markdown tables.

    python benchmarks/run_all.py [--quick] [--only peers,sampler] [--threads 2]

Names are the script names without the ``bench_`` prefix. Tables go to stdout and to
``benchmarks/results/summary.md``; per-benchmark JSON to ``benchmarks/results/<script>.json``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common as C  # noqa: E402

ORDER = ("peers", "framework", "latents", "sampler", "flops", "loader", "scaling", "knobs", "large_images", "lanes",
         "artifacts")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(ORDER)}")
    p.add_argument("--threads", type=int, default=C.THREADS)
    args = p.parse_args()
    names = [n.strip().removeprefix("bench_") for n in args.only.split(",") if n.strip()] or list(ORDER)
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(ORDER)}")
    import torch

    torch.set_num_threads(args.threads)
    header = "## Machine\n\n" + "\n".join(f"- {k}: {v}" for k, v in C.machine_info().items()) + "\n"
    print(header, flush=True)
    parts, failed = [header], []
    for name in names:
        cmd = [sys.executable, str(HERE / f"bench_{name}.py"), "--threads", str(args.threads)]
        cmd += ["--quick"] if args.quick else []
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
        took = time.perf_counter() - t0
        if proc.returncode:
            failed.append(name)
            print(f"bench_{name} FAILED (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
            continue
        text = proc.stdout[proc.stdout.find("### "):] if "### " in proc.stdout else proc.stdout
        text += f"\n_`{' '.join(['python', f'benchmarks/bench_{name}.py'] + (['--quick'] if args.quick else []))}`, {took:.0f} s_\n"
        print(text, flush=True)
        parts.append(text)
    C.RESULTS.mkdir(parents=True, exist_ok=True)
    from refiner.io import atomic_write_text

    atomic_write_text(C.RESULTS / "summary.md", "\n".join(parts))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Side-by-side training lanes: one run on 2 threads vs two runs on 1 thread each, at the same time.

``make demo`` trains the windows and the full-range model side by side with ``OMP_NUM_THREADS=1`` each
(scripts/demo.sh). This measures why: for each model, alternately (A B A B, ``--rounds``), (A) one fresh
subprocess with 2 threads runs fwd + loss + bwd + AdamW steps (``common.make_train_step`` for the demo UNet,
an L1 round-trip step for the demo VQ-f4 on 32 px crops, as their demo configs train them), (B) two fresh
subprocesses with 1 thread each run the same steps concurrently. Reported: median step time per process and
the throughput ratio B/A in optimizer steps per second over both lanes (> 1: lanes pay).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import common as C

MODELS = ("unet", "vq_f4")


def worker(model: str, steps: int) -> None:
    import torch

    torch.manual_seed(0)
    if model == "unet":
        from refiner.models.unet import UNetModel

        net = UNetModel(**C.demo_unet_params())
        x, t = torch.randn(16, 3, 16, 16), torch.randint(0, 1000, (16,))
        step = C.make_train_step(net, x, t)
    else:
        vq = C.build_vq(C.demo_vq_params(4))
        x = torch.rand(16, 3, 32, 32) * 2 - 1
        opt = torch.optim.Adam(vq.parameters(), 1e-3, betas=(0.5, 0.9))

        def step():
            opt.zero_grad()
            rec, codebook = vq(x)
            ((rec - x).abs().mean() + codebook).backward()
            opt.step()
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"median_ms": statistics.median(times)}))


def run_lanes(model: str, lanes: int, threads: int, steps: int) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", model, str(steps)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(lanes)]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"worker failed ({model}, {lanes} x {threads} threads)")
        out.append(json.loads(stdout.strip().splitlines()[-1])["median_ms"])
    return out


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="ignored: the comparison fixes the thread counts (2 vs 1+1)")
    args = p.parse_args()
    steps, rounds = (10, 1) if args.quick else (30, args.rounds)
    rows, payload = [], {}
    for model in MODELS:
        one, two = [], []
        for _ in range(rounds):
            one += run_lanes(model, 1, 2, steps)
            two += run_lanes(model, 2, 1, steps)
        a, b = statistics.median(one), statistics.median(two)
        ratio = (2 / b) / (1 / a)
        payload[model] = {"one_run_2_threads_ms": one, "two_runs_1_thread_ms": two, "throughput_ratio": ratio}
        rows.append([model, C.fmt(a, 1), C.fmt(b, 1), C.fmt(ratio)])
    table = C.print_table("Two 1-thread lanes vs one 2-thread run (training steps)",
                          ["model", "1 run x 2 threads, ms/step", "2 runs x 1 thread, ms/step each",
                           "throughput, 2 lanes / 1 run"], rows)
    C.write_result("bench_lanes", {"command": C.command("bench_lanes", args.quick), "steps": steps,
                                   "rounds": rounds, "results": payload, "table": table})


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]))
    else:
        main()

"""The blog's recipe, measured over training seeds: finetune a window from a pretrained full-range model, against
finetuning the whole range for the same steps (issue 22, item 3, second part).

    python scripts/finetune_efficiency.py --study outputs/heads/seeds_study --out outputs/heads/finetune_study \
        [--seeds 0 1 2] [--steps 400] [--val-every 50]

For each training seed S of a finished ``refiner bench-seeds`` study, its full-range model (``seed_S/full_range``,
1600 steps on every t) is the "released" model. From it, each for ``--steps`` steps with seed S and validation every
``--val-every`` steps: the shape window t in [250, 500), the detail window t in [0, 250) (each finetuned from the
full-range model directly, not chained) and the full range again. Then :mod:`refiner.bench.efficiency`: the steps
each window needs to reach the finetuned full-range model's final loss in its window, and the ratio with its
interval over seeds. Every run is ``python -m refiner train experiment=demo_... init_from=...`` as a user would type
it; a run already at its budget is kept, so a re-run resumes.

Why a script and not a command: it is one experiment on top of the seeds study, run by hand for
docs/experiments/efficiency.md; the pieces it calls (training, :mod:`refiner.bench.efficiency`) are tested.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from refiner.apps.lanes import Job, Runner
from refiner.bench import efficiency

RUNS = (("refiner_500_750", "demo_refiner_500_750", "val/loss_in_250_500"),
        ("refiner_751_1000", "demo_refiner_751_1000", "val/loss_in_0_250"),
        ("full_range", "demo_full_range", None))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", required=True, help="a finished refiner bench-seeds study folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--val-every", type=int, default=50)
    a = ap.parse_args()
    study = Path(a.study)
    record = json.loads((study / "study.json").read_text())
    out = Path(a.out)
    runner = Runner(out / "logs")
    for seed in a.seeds:
        pretrained = study / f"seed_{seed}" / "full_range" / "checkpoints" / "last.ckpt"
        if not pretrained.is_file():
            print(f"error: {pretrained}: no such file (the study has not trained seed {seed})", file=sys.stderr)
            return 2
        seed_dir = out / f"seed_{seed}"
        jobs = []
        for run, experiment, _ in RUNS:
            last = seed_dir / run / "checkpoints" / "last.ckpt"
            if last.is_file() and int(torch.load(last, weights_only=True).get("global_step", 0)) >= a.steps:
                continue
            jobs.append(Job(f"seed_{seed}_{run}", [
                "train", f"experiment={experiment}", f"paths.data_dir={record['data_dir']}",
                f"paths.demo={record['demo']}", f"paths.demo_outputs={seed_dir}",
                f"first_stage.f4.ckpt_path={record['vq_f4']}", f"first_stage.f8.ckpt_path={record['vq_f8']}",
                f"seed={seed}", f"init_from={pretrained}", f"trainer.max_steps={a.steps}",
                f"trainer.val_check_interval={a.val_every}", "model.warmup_steps=0"]))
        if jobs:
            print(f"seed {seed}: finetuning {', '.join(j.name for j in jobs)} from {pretrained}", flush=True)
            runner.run_lanes([jobs[::2], jobs[1::2]], threads=1)
    results = {}
    for (window, _, metric), (name, *_) in zip(RUNS[:2], efficiency.COMPARISONS):
        reaches = [efficiency.reach(out / f"seed_{s}", metric, window) for s in a.seeds]
        results[name] = {"metric": metric, "per_seed": reaches,
                                           "summary": efficiency.summary(reaches)}
    text = efficiency.markdown(results, a.seeds, chained=False)
    (out / "finetune.md").write_text(f"Finetuned from each seed's full-range model for {a.steps} steps "
                                     f"(validation every {a.val_every}).\n\n" + text)
    (out / "finetune.json").write_text(json.dumps(efficiency.to_json(results, a.seeds), indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

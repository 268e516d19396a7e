"""Does the same seed give the same model under another CPU kernel set? (issue 22, item 5)

    python scripts/determinism.py train --out /tmp/det/train --steps 200     # the training matrix
    python scripts/determinism.py probe --out /tmp/det/probe                 # which op first differs
    python scripts/determinism.py report --out /tmp/det                      # both tables as markdown

We have one machine type (AMD EPYC, AVX-512), so other CPUs are emulated by the switches that choose kernels at run
time, each set in a fresh subprocess:

* ``ATEN_CPU_CAPABILITY`` (``default`` / ``avx2`` / ``avx512``): which build of PyTorch's own vectorised kernels runs
  (element-wise ops, reductions, GroupNorm, softmax, SDPA's CPU flash attention, the foreach ops of AdamW);
* ``ONEDNN_MAX_CPU_ISA`` (``SSE41`` / ``AVX2`` / ``ALL`` ...): the highest instruction set oneDNN's JIT may use (it runs
  ``conv2d`` forward and backward on CPU);
* ``MKL_ENABLE_INSTRUCTIONS`` (``SSE4_2`` / ``AVX2`` / ``AVX512``) and ``MKL_CBWR`` (MKL's conditional numerical
  reproducibility; ``COMPATIBLE`` = one code path on every x86 CPU): MKL runs sgemm (``nn.Linear``, ``bmm``, and the
  im2col convolution when oneDNN is off);
* the thread count (``OMP_NUM_THREADS`` and ``torch.set_num_threads``), ``torch.backends.mkldnn.enabled`` and
  ``torch.use_deterministic_algorithms`` (Lightning's ``trainer.deterministic=true``).

``train`` runs the real command, ``refiner train experiment=demo_refiner_500_750`` on the demo's shards and first
stages (``--data``, ``--vq-f4``, ``--vq-f8``; default the ones in /work/seeds/base), for ``--steps`` steps with the
train loss logged every step, once per setting, and compares each run's final raw weights
(``current_model_state``), EMA weights (``state_dict``), ``scale_factor`` and per-step losses with its reference run.
``probe`` builds the demo's UNet (``conf/model/refiner_tiny.yaml``) and, under each setting, records single ops on
fixed inputs, every module's forward output, every parameter's gradient and one AdamW step, all from the same
inputs saved once by the parent, and reports which of them differ from the reference.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEEDS_BASE = Path("/work/seeds/base")


@dataclass(frozen=True)
class Setting:
    """One way of running: environment variables, thread count, oneDNN on/off, deterministic algorithms on/off.
    ``against``: the name of the setting it is compared with (``None``: it is a reference)."""

    name: str
    env: dict = field(default_factory=dict)
    threads: int = 1
    mkldnn: bool = True
    deterministic: bool = False
    against: str | None = "reference"


# The candidate recipe for bit-identical training on any x86 CPU: PyTorch's baseline kernels, no oneDNN, MKL on its
# one compatible code path, one thread.
RECIPE_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}
AVX2_MACHINE = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
SSE4_MACHINE = {"ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}

SETTINGS = (
    Setting("reference", against=None),
    Setting("reference, again"),
    Setting("2 threads", threads=2),
    Setting("ATEN_CPU_CAPABILITY=avx2", {"ATEN_CPU_CAPABILITY": "avx2"}),
    Setting("ATEN_CPU_CAPABILITY=default", {"ATEN_CPU_CAPABILITY": "default"}),
    Setting("ONEDNN_MAX_CPU_ISA=AVX2", {"ONEDNN_MAX_CPU_ISA": "AVX2"}),
    Setting("ONEDNN_MAX_CPU_ISA=SSE41", {"ONEDNN_MAX_CPU_ISA": "SSE41"}),
    Setting("MKL_ENABLE_INSTRUCTIONS=AVX2", {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}),
    Setting("MKL_ENABLE_INSTRUCTIONS=AVX512", {"MKL_ENABLE_INSTRUCTIONS": "AVX512"}),
    Setting("MKL_CBWR=AVX2", {"MKL_CBWR": "AVX2"}),
    Setting("MKL_CBWR=COMPATIBLE", {"MKL_CBWR": "COMPATIBLE"}),
    Setting("oneDNN off (torch.backends.mkldnn.enabled=False)", mkldnn=False),
    Setting("deterministic algorithms on", deterministic=True),
    Setting("emulated AVX2 machine (all three at AVX2)", AVX2_MACHINE),
    Setting("recipe", RECIPE_ENV, mkldnn=False),
    Setting("recipe, again", RECIPE_ENV, mkldnn=False, against="recipe"),
    Setting("recipe on the emulated AVX2 machine", {**AVX2_MACHINE, **RECIPE_ENV}, mkldnn=False, against="recipe"),
    Setting("recipe on an emulated SSE4 machine", {**SSE4_MACHINE, **RECIPE_ENV}, mkldnn=False, against="recipe"),
    Setting("recipe, 2 threads", RECIPE_ENV, threads=2, mkldnn=False, against="recipe"),
)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


# ---------------------------------------------------------------------------------------------------- comparisons

def compare_tensors(a: dict, b: dict) -> dict:
    """Compare two dicts of tensors (state dicts, recorded ops): ``identical`` (same keys, shapes, dtypes and bits),
    ``max_abs`` (largest absolute difference over the shared keys; ``inf`` where shapes differ or a value is
    non-finite in one only), ``differ`` (the keys that differ, in ``a``'s order) and ``missing`` (keys in only one)."""
    import torch

    missing = sorted(set(a) ^ set(b))
    differ, max_abs = [], 0.0
    for key in a:
        if key not in b:
            continue
        x, y = a[key], b[key]
        if x.shape != y.shape or x.dtype != y.dtype:
            differ.append(key)
            max_abs = math.inf
            continue
        if torch.equal(x, y):  # NaN != NaN: a NaN anywhere counts as a difference, which is what we want
            continue
        differ.append(key)
        d = (x.double() - y.double()).abs()
        d = torch.where(torch.isnan(d), torch.full_like(d, math.inf), d)
        max_abs = max(max_abs, float(d.max()))
    return {"identical": not missing and not differ, "max_abs": max_abs, "differ": differ, "missing": missing}


def first_divergence(a: dict[int, float], b: dict[int, float]) -> int | None:
    """The first step whose loss differs between two runs (``{step: loss}``), or whose loss only one run logged;
    ``None`` if every logged step agrees exactly."""
    for step in sorted(set(a) | set(b)):
        if a.get(step) != b.get(step) and not (a.get(step) is not None and b.get(step) is not None
                                                and math.isnan(a[step]) and math.isnan(b[step])):
            return step
    return None


def read_losses(metrics_csv: Path, key: str = "train/loss") -> dict[int, float]:
    """``{step: loss}`` from a Lightning CSVLogger ``metrics.csv`` (rows without that key are skipped)."""
    with open(metrics_csv, newline="") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


# ---------------------------------------------------------------------------------------------------- children

def child_env(s: Setting) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                        "MKL_CBWR")}
    env.update(OMP_NUM_THREADS=str(s.threads), MKL_NUM_THREADS=str(s.threads), WANDB_MODE="disabled",
               PYTHONPATH=str(ROOT), **s.env)
    return env


def child_flags(s: Setting) -> list[str]:
    return ["--threads", str(s.threads), "--mkldnn", "on" if s.mkldnn else "off",
            "--deterministic", "on" if s.deterministic else "off"]


def apply_flags(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.backends.mkldnn.enabled = args.mkldnn == "on"
    if args.deterministic == "on":
        torch.use_deterministic_algorithms(True)


def train_argv(args, s: Setting, run_dir: Path) -> list[str]:
    steps = args.steps
    return ["experiment=demo_refiner_500_750", f"paths.data_dir={args.data}", "paths.demo=heads",
            f"paths.demo_outputs={run_dir}", f"first_stage.f4.ckpt_path={args.vq_f4}",
            f"first_stage.f8.ckpt_path={args.vq_f8}", f"seed={args.seed}", f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}", "trainer.log_every_n_steps=1", "logger=[csv]",
            *(["trainer.deterministic=true"] if s.deterministic else [])]


def child_train(args, rest: list[str]) -> int:
    """Apply the flags, then run ``refiner train`` in this process, timing ``Trainer.fit``."""
    apply_flags(args)
    import pytorch_lightning as pl
    import torch

    from refiner.apps.commands import main

    fit = pl.Trainer.fit
    trace: list[str] = []

    class WeightTrace(pl.Callback):
        """A SHA-256 of the raw weights before training and after every optimizer step: the first step at which
        two runs' weights differ (the float32 loss shows a difference only once it has grown)."""

        def _record(self, module) -> None:
            h = hashlib.sha256()
            for p in module.unet.parameters():
                h.update(p.detach().numpy().tobytes())
            trace.append(h.hexdigest()[:16])

        def on_train_start(self, trainer, module) -> None:
            self._record(module)

        def on_train_batch_end(self, trainer, module, *a) -> None:
            self._record(module)

    def timed_fit(self, *a, **kw):
        self.callbacks.append(WeightTrace())
        start = time.perf_counter()
        out = fit(self, *a, **kw)
        info = {"fit_seconds": time.perf_counter() - start, "steps": self.global_step, "weight_trace": trace,
                "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                "mkldnn": torch.backends.mkldnn.enabled,
                "deterministic": torch.are_deterministic_algorithms_enabled()}
        Path(args.info).write_text(json.dumps(info))
        return out

    pl.Trainer.fit = timed_fit
    return main(["train", *rest])


# The demo's UNet (conf/model/refiner_tiny.yaml) and its batch (16 latents of 3x16x16).
UNET = dict(image_size=16, in_channels=3, out_channels=3, model_channels=32, channel_mult=[1, 2, 2],
            num_res_blocks=1, attention_resolutions=[4], num_head_channels=32, dropout=0.0,
            use_scale_shift_norm=True, resblock_updown=False)


def make_inputs(path: Path) -> None:
    """Inputs shared by every probe child: the UNet's initial weights, a batch, its timesteps and targets, and the
    operands of the single ops (all drawn once here, so only the kernels differ between children)."""
    import torch

    from refiner.models.unet import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(**UNET)
    g = torch.Generator().manual_seed(1)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    # the default init plus N(0, 0.02^2) noise: the zero-initialised output layers (zero_module) would otherwise
    # give an output of exactly 0 and no gradient to the layers before them, hiding every difference
    weights = {k: v + 0.02 * r(*v.shape) if v.is_floating_point() else v for k, v in unet.state_dict().items()}
    torch.save({"unet": weights, "x": r(16, 3, 16, 16), "t": torch.randint(250, 500, (16,), generator=g),
                "target": r(16, 3, 16, 16),
                "conv_x": r(16, 64, 16, 16), "conv_w": r(64, 64, 3, 3) * 0.05, "conv_gy": r(16, 64, 16, 16),
                "gn_x": r(16, 64, 16, 16), "gn_w": 1 + 0.1 * r(64), "gn_b": 0.1 * r(64),
                "lin_x": r(16, 128), "lin_w": r(512, 128) * 0.1,
                "q": r(16, 2, 64, 32), "k": r(16, 2, 64, 32), "v": r(16, 2, 64, 32),
                "vec": r(1 << 20), "adam_p": r(4096), "adam_g": r(4096) * 0.01}, path)


def child_probe(args) -> int:
    """Record single ops, module outputs, gradients and one AdamW step under this process's settings."""
    apply_flags(args)
    import torch
    import torch.nn.functional as F

    from refiner.models.unet import UNetModel

    inp = torch.load(args.inputs, weights_only=True)
    rec: dict[str, torch.Tensor] = {}
    # the default initialisation under these settings (seeded as the training's)
    torch.manual_seed(0)
    for k, v in UNetModel(**UNET).state_dict().items():
        rec[f"init/{k}"] = v
    # single ops
    x = inp["conv_x"].clone().requires_grad_(True)
    w = inp["conv_w"].clone().requires_grad_(True)
    y = F.conv2d(x, w, padding=1)
    y.backward(inp["conv_gy"])
    rec["op/conv2d forward"], rec["op/conv2d grad input"], rec["op/conv2d grad weight"] = y.detach(), x.grad, w.grad
    x = inp["gn_x"].clone().requires_grad_(True)
    y = F.group_norm(x, 32, inp["gn_w"], inp["gn_b"])
    y.backward(inp["conv_gy"])
    rec["op/group_norm forward"], rec["op/group_norm grad input"] = y.detach(), x.grad
    rec["op/linear (sgemm)"] = F.linear(inp["lin_x"], inp["lin_w"])
    rec["op/bmm"] = torch.bmm(inp["q"].flatten(0, 1), inp["k"].flatten(0, 1).transpose(1, 2))
    rec["op/softmax"] = torch.softmax(rec["op/bmm"], -1)
    rec["op/sdpa"] = F.scaled_dot_product_attention(inp["q"], inp["k"], inp["v"])
    rec["op/silu"] = F.silu(inp["gn_x"])
    rec["op/exp"] = torch.exp(inp["vec"])
    rec["op/sum of 2^20 floats"] = inp["vec"].sum()
    p = inp["adam_p"].clone().requires_grad_(True)
    opt = torch.optim.AdamW([p], lr=5e-4)
    for _ in range(3):
        p.grad = inp["adam_g"].clone()
        opt.step()
    rec["op/AdamW, 3 steps (foreach)"] = p.detach()
    # the UNet: every module's output in forward order, the loss, every gradient, one AdamW step
    unet = UNetModel(**UNET)
    unet.load_state_dict(inp["unet"])
    order: list[str] = []

    def hook(name):
        def f(_m, _i, out):
            if torch.is_tensor(out):
                order.append(name)
                rec[f"fwd/{name}"] = out.detach().clone()
        return f

    for name, m in unet.named_modules():
        if name:
            m.register_forward_hook(hook(name))
    out = unet(inp["x"], inp["t"])
    loss = F.mse_loss(out, inp["target"])
    loss.backward()
    rec["unet/loss"] = loss.detach()
    for name, prm in unet.named_parameters():
        rec[f"grad/{name}"] = prm.grad.clone()
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-4)
    opt.step()
    for name, prm in unet.named_parameters():
        rec[f"step/{name}"] = prm.detach().clone()
    torch.save({"rec": rec, "order": order, "capability": torch.backends.cpu.get_cpu_capability()}, args.record)
    return 0


# ---------------------------------------------------------------------------------------------------- parents

def run_child(s: Setting, argv: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], env=child_env(s), cwd=ROOT,
                              stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"error: {s.name}: exit {proc.returncode}, see {log}")
    return time.perf_counter() - start


def cmd_train(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for s in selected(args):
        run_dir = out / slug(s.name)
        info = run_dir / "info.json"
        if info.exists():
            print(f"{s.name}: done before, kept")
            continue
        run_dir.mkdir(exist_ok=True)
        wall = run_child(s, ["_train", *child_flags(s), "--info", str(info), "--", *train_argv(args, s, run_dir)],
                         run_dir / "log.txt")
        print(f"{s.name}: {wall:.0f} s", flush=True)
    return 0


def load_train(run_dir: Path) -> dict:
    import torch

    ckpt = torch.load(run_dir / "refiner_500_750" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)
    return {"raw": dict(ckpt["current_model_state"]), "ema": dict(ckpt["state_dict"]),
            "scale_factor": ckpt["hyper_parameters"]["scale_factor"],
            "losses": read_losses(run_dir / "refiner_500_750" / "csv" / "version_0" / "metrics.csv"),
            "info": json.loads((run_dir / "info.json").read_text())}


def train_table(out: Path) -> list[str]:
    rows = ["| setting | compared with | raw weights identical | max abs diff (raw) | EMA identical | "
            "scale_factor equal | weights first differ after step | first step whose loss differs | "
            "fit time vs its reference |",
            "|---|---|---|---|---|---|---|---|---|"]
    cache = {}
    for s in SETTINGS:
        if not (out / slug(s.name) / "info.json").exists():
            continue
        cache[s.name] = load_train(out / slug(s.name))
    for s in SETTINGS:
        if s.against is None or s.name not in cache or s.against not in cache:
            continue
        a, b = cache[s.against], cache[s.name]
        raw, ema = compare_tensors(a["raw"], b["raw"]), compare_tensors(a["ema"], b["ema"])
        step = first_divergence(a["losses"], b["losses"])
        wa, wb = a["info"]["weight_trace"], b["info"]["weight_trace"]
        wstep = next((i for i, (x, y) in enumerate(zip(wa, wb)) if x != y), None if len(wa) == len(wb) else -1)
        ratio = b["info"]["fit_seconds"] / a["info"]["fit_seconds"]
        rows.append(f"| {s.name} | {s.against} | {'yes' if raw['identical'] else 'no'} | {raw['max_abs']:.2e} | "
                    f"{'yes' if ema['identical'] else 'no'} | {'yes' if a['scale_factor'] == b['scale_factor'] else 'no'}"
                    f" | {'none' if wstep is None else wstep} | {'none' if step is None else step} | {ratio:.2f} |")
    steps = {c["info"]["steps"] for c in cache.values()}
    rows.append("")
    rows.append(f"Steps per run: {sorted(steps)}. Fit times (s): "
                + ", ".join(f"{k}: {v['info']['fit_seconds']:.1f}" for k, v in cache.items()) + ".")
    return rows


def cmd_probe(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    inputs = out / "inputs.pt"
    if not inputs.exists():
        make_inputs(inputs)
    for s in selected(args):
        record = out / f"{slug(s.name)}.pt"
        if record.exists():
            continue
        run_child(s, ["_probe", *child_flags(s), "--inputs", str(inputs), "--record", str(record)],
                  out / f"{slug(s.name)}.log")
        print(f"{s.name}: probed", flush=True)
    return 0


def probe_table(out: Path) -> list[str]:
    import torch

    recs = {s.name: torch.load(out / f"{slug(s.name)}.pt", weights_only=False) for s in SETTINGS
            if (out / f"{slug(s.name)}.pt").exists()}
    ops = [k for k in next(iter(recs.values()))["rec"] if k.startswith("op/")]
    rows = ["| setting | " + " | ".join(k[3:] for k in ops) + " | init | first UNet module whose output differs "
            "| UNet loss | grads differing | after AdamW |",
            "|---|" + "---|" * (len(ops) + 5)]
    for s in SETTINGS:
        if s.against is None or s.name not in recs or s.against not in recs:
            continue
        a, b = recs[s.against]["rec"], recs[s.name]["rec"]
        cells = []
        for k in ops:  # relative: the largest difference over the reference's largest magnitude
            c = compare_tensors({k: a[k]}, {k: b[k]})
            cells.append("=" if c["identical"] else f"{c['max_abs'] / float(a[k].abs().max()):.0e}")
        part = lambda p: compare_tensors({k: v for k, v in a.items() if k.startswith(p)},  # noqa: E731
                                         {k: v for k, v in b.items() if k.startswith(p)})
        init, grads, step, loss = part("init/"), part("grad/"), part("step/"), part("unet/loss")
        first = next((n for n in recs[s.against]["order"] if not torch.equal(a[f"fwd/{n}"], b[f"fwd/{n}"])), None)
        ngrad = sum(1 for k in a if k.startswith("grad/"))
        cells += ["=" if init["identical"] else f"{init['max_abs']:.0e}", f"`{first}`" if first else "none",
                  "=" if loss["identical"] else f"{loss['max_abs']:.0e}",
                  f"{len(grads['differ'])} of {ngrad}" + (f" ({grads['max_abs']:.0e})" if grads["differ"] else ""),
                  "=" if step["identical"] else f"{step['max_abs']:.0e}"]
        rows.append(f"| {s.name} | " + " | ".join(cells) + " |")
    rows.append("")
    rows.append("`=`: bit-identical to the setting it is compared with; a number: the largest absolute difference "
                "(for the single ops divided by the reference's largest magnitude). "
                "Capabilities seen: " + ", ".join(sorted({r['capability'] for r in recs.values()})) + ".")
    return rows


def cmd_report(args) -> int:
    out = Path(args.out)
    text = []
    if (out / "probe").exists():
        text += ["## Single ops and one UNet step", "", *probe_table(out / "probe"), ""]
    if (out / "train").exists():
        text += ["## Training", "", *train_table(out / "train"), ""]
    print("\n".join(text))
    return 0


def selected(args) -> list[Setting]:
    if not args.only:
        return list(SETTINGS)
    chosen = [s for s in SETTINGS if slug(s.name) in args.only or s.name in args.only]
    missing = set(args.only) - {slug(s.name) for s in chosen} - {s.name for s in chosen}
    if missing:
        raise SystemExit(f"error: unknown settings {sorted(missing)}; known: {[slug(s.name) for s in SETTINGS]}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["_train"], ["_probe"]):
        p = argparse.ArgumentParser()
        p.add_argument("mode")
        p.add_argument("--threads", type=int, required=True)
        p.add_argument("--mkldnn", choices=("on", "off"), required=True)
        p.add_argument("--deterministic", choices=("on", "off"), required=True)
        p.add_argument("--info")
        p.add_argument("--inputs")
        p.add_argument("--record")
        rest = argv[argv.index("--") + 1:] if "--" in argv else []
        args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
        return child_train(args, rest) if args.mode == "_train" else child_probe(args)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("train", "probe", "report"))
    p.add_argument("--out", required=True, help="a folder of your own (runs are resumed: finished settings kept)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=str(SEEDS_BASE / "data"))
    p.add_argument("--vq-f4", default=str(SEEDS_BASE / "vq_f4" / "checkpoints" / "last.ckpt"))
    p.add_argument("--vq-f8", default=str(SEEDS_BASE / "vq_f8" / "checkpoints" / "last.ckpt"))
    p.add_argument("--only", nargs="*", help="setting names or slugs (default: all)")
    args = p.parse_args(argv)
    return {"train": cmd_train, "probe": cmd_probe, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())

"""Re-run issue 21's reliability cases through the real commands and report each with its exit code and message.

    python scripts/reliability_cases.py --work /tmp/reliability [--out docs/experiments/reliability.md]

Builds the test suite's tiny world once (32 px demo images -> VQ-f4/f8 -> shards, a full-range window; about two
minutes on 2 cores, reused when ``--work`` already holds it), then runs every case as a user would: a subprocess of
``refine.py``, ``train.py``, ``build_shards.py`` or ``python -m refiner export``, with its own umask, user (``nobody``
for the permission cases, via ``setpriv``; those rows are skipped when not run as root) and, for disk-full cases, a
small tmpfs (root only). Each row records the exit code, the ``error:`` line (or the last line of stderr), how many
lines stderr held, and whether the promise of the issue held (an input's sha256 unchanged, a folder still there, a
checkpoint written, ...). Writes ``cases.json`` under ``--work`` and, with ``--out``, the markdown table.

Why a script and not tests: the cases need root (tmpfs, another user), real signals and whole processes; the test
suite covers each class in-process (tests/test_inputs_sacred.py, test_file_modes.py, test_export_safety.py,
test_cli_contract.py, ...). This script is the end-to-end record, run by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@dataclass
class Row:
    group: str
    case: str
    command: str
    exit: int | None
    message: str
    stderr_lines: int
    expected: str
    held: bool | None  # None: not run here (needs root)


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WANDB_MODE="disabled", WANDB_SILENT="true",
                HYDRA_FULL_ERROR="0")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shas(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha(p) for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def message_of(stderr: str) -> tuple[str, int]:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    text = errors[0] if errors else (lines[-1] if lines else "")
    return text.strip()[:300], len(lines)


def run(cmd: list[str], cwd: Path | None = None, user: str | None = None, umask: int | None = None,
        timeout: float = 900) -> subprocess.CompletedProcess:
    if user is not None:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]

    def pre() -> None:
        if umask is not None:
            os.umask(umask)

    return subprocess.run(cmd, cwd=cwd or ROOT, env=env(), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=pre)


def short(cmd: list[str], work: Path) -> str:
    text = " ".join(str(c) for c in cmd).replace(PY, "python").replace(str(work), "$W").replace(str(ROOT) + "/", "")
    return text if len(text) < 160 else text[:157] + "..."


class Cases:
    def __init__(self, work: Path):
        self.work = work
        self.rows: list[Row] = []
        self.world = None
        self.window: Path | None = None

    # ---- the tiny world ----
    def build(self) -> None:
        sys.path.insert(0, str(ROOT / "tests"))
        from pipeline import CROP, TINY_UNET, World, build_world  # noqa: F401  (the suite's world)

        state = self.work / "world.json"
        if state.exists():
            d = json.loads(state.read_text())
            self.world = World(Path(d["root"]), Path(d["demo_dir"]), Path(d["shards_dir"]), Path(d["f4"]),
                               Path(d["f8"]))
            self.window = Path(d["window"])
            return
        torch.set_num_threads(1)
        world = build_world(self.work / "world")
        result = world.train_refiner("demo_full_range", self.work / "full_range")
        self.world, self.window = world, Path(result["last_ckpt"])
        state.write_text(json.dumps({"root": str(world.root), "demo_dir": str(world.demo_dir),
                                     "shards_dir": str(world.shards_dir), "f4": str(world.f4_ckpt),
                                     "f8": str(world.f8_ckpt), "window": str(self.window)}))

    def images(self, folder: Path, n: int, names: list[str] | None = None, size: int = 32) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        sources = sorted(p for p in self.world.demo_dir.rglob("*") if p.suffix.lower() in (".png", ".jpg"))
        out = []
        for i in range(n):
            name = names[i] if names else f"img{i:02d}.png"
            img = Image.open(sources[i % len(sources)]).convert("RGB").resize((size, size))
            img.save(folder / name)
            out.append(folder / name)
        return out

    def refine_cmd(self, inputs: Path | str, output_dir: Path, *extra: str, experts: list[Path] | None = None,
                   hydra_dir: bool = True) -> list[str]:
        ex = ",".join(str(p) for p in (experts or [self.window]))
        cmd = [PY, "refine.py", f"inputs={inputs}", f"output_dir={output_dir}", f"experts=[{ex}]",
               f"first_stage.f4.ckpt_path={self.world.f4_ckpt}", "first_stage.f4.params.ddconfig.resolution=32",
               f"first_stage.f8.ckpt_path={self.world.f8_ckpt}", "first_stage.f8.params.ddconfig.resolution=32",
               "steps=3", "t_start=499"]
        if hydra_dir:
            cmd.append(f"hydra.run.dir={self.work / 'hydra' / str(len(self.rows))}")
        return [*cmd, *extra]

    def train_cmd(self, out: Path, *extra: str, experiment: str = "demo_full_range") -> list[str]:
        from pipeline import TINY_UNET

        from conftest import TINY_TRAINER

        return [PY, "train.py", f"experiment={experiment}", *TINY_TRAINER, *self.world.paths(), *TINY_UNET,
                f"paths.output_dir={out}", f"hydra.run.dir={out}", *extra]

    def shards_cmd(self, out: Path, *extra: str, images: Path | None = None) -> list[str]:
        return [PY, "build_shards.py", *self.world.paths(), f"splits.train.images={images or self.world.demo_dir / 'train'}",
                f"splits.train.out={out}", "~splits.val", f"hydra.run.dir={self.work / 'hydra' / str(len(self.rows))}",
                *extra]

    def add(self, group: str, case: str, cmd: list[str], proc, expected: str, held: bool | None) -> None:
        msg, n = message_of(proc.stderr) if proc is not None else ("(not run: needs root)", 0)
        self.rows.append(Row(group, case, short(cmd, self.work), None if proc is None else proc.returncode, msg, n,
                             expected, held))
        mark = {True: "held", False: "FAILED", None: "skipped"}[held]
        print(f"[{mark}] {group} / {case}: exit {None if proc is None else proc.returncode}: {msg}", flush=True)

    # ---- data lost ----
    def data_lost(self) -> None:
        w = self.work / "lost"
        shutil.rmtree(w, ignore_errors=True)
        # 1. inputs and output_dir in one folder, an input named grid.png
        f = w / "one_folder"
        self.images(f, 3, ["a.png", "b.png", "grid.png"])
        before = shas(f)
        cmd = self.refine_cmd(f, f, "overwrite=true", "grid=combined")
        p = run(cmd)
        self.add("data lost", "overwrite=true, inputs and output_dir one folder, an input named grid.png", cmd, p,
                 "no input changed", all(sha(f / k) == v for k, v in before.items()))
        # 2. output_dir/grids a symlink to the input folder, grid=per_image
        f, o = w / "grids_in", w / "grids_out"
        self.images(f, 2, ["a.png", "b.png"])
        o.mkdir(parents=True)
        (o / "grids").symlink_to(f, target_is_directory=True)
        before = shas(f)
        cmd = self.refine_cmd(f, o, "overwrite=true", "grid=per_image")
        p = run(cmd)
        self.add("data lost", "overwrite=true, output_dir/grids a symlink to the inputs, grid=per_image", cmd, p,
                 "no input changed", shas(f) == before)
        # 3. an output name hard-linked to an input
        f, o = w / "hard_in", w / "hard_out"
        self.images(f, 2, ["a.png", "b.png"])
        o.mkdir(parents=True)
        os.link(f / "a.png", o / "a.png")
        before = shas(f)
        cmd = self.refine_cmd(f, o, "overwrite=true", "grid=none")
        p = run(cmd)
        self.add("data lost", "overwrite=true, output a.png a hard link of input a.png", cmd, p, "no input changed",
                 shas(f) == before)
        # 4-6. export --force
        e = w / "export"
        first = e / "first"
        cmd = [PY, "-m", "refiner", "export", "diffusers", str(self.window), str(first)]
        p = run(cmd)
        self.add("data lost", "export diffusers into a new folder (control)", cmd, p, "exit 0, manifest written",
                 p.returncode == 0 and (first / "refiner_chain.json").exists())
        foreign = e / "foreign"
        (foreign / "sub").mkdir(parents=True)
        (foreign / "notes.txt").write_text("mine")
        (foreign / "sub" / "data.bin").write_bytes(b"\0" * 16)
        cmd = [PY, "-m", "refiner", "export", "diffusers", str(self.window), str(foreign), "--force"]
        p = run(cmd)
        self.add("data lost", "export --force onto a folder that is not an export (notes.txt, sub/data.bin)", cmd, p,
                 "refused, exit 2, folder untouched",
                 p.returncode == 2 and (foreign / "notes.txt").read_text() == "mine" and (foreign / "sub/data.bin").exists())
        link = e / "link"
        link.symlink_to(first, target_is_directory=True)
        cmd = [PY, "-m", "refiner", "export", "diffusers", str(self.window), str(link), "--force"]
        p = run(cmd)
        stray = [x.name for x in e.iterdir() if ".old" in x.name or ".tmp" in x.name]
        self.add("data lost", "export --force onto a symlink to an earlier export", cmd, p,
                 "one line or exit 0; link kept; no traceback, no stray folder",
                 "Traceback" not in p.stderr and not stray and link.is_symlink())
        cmd = [PY, "-m", "refiner", "export", "diffusers", str(self.window), str(first), "--force"]
        p = run(cmd)
        self.add("data lost", "export --force onto a previous export (control)", cmd, p, "exit 0, replaced",
                 p.returncode == 0 and (first / "refiner_chain.json").exists())

    # ---- silently wrong ----
    def silently_wrong(self) -> None:
        w = self.work / "wrong"
        shutil.rmtree(w, ignore_errors=True)
        f = w / "in"
        self.images(f, 2)
        exp = w / "export"
        run([PY, "-m", "refiner", "export", "diffusers", str(self.window), str(exp)])
        cfg = json.loads((exp / "vqvae" / "config.json").read_text())
        groups = cfg.get("norm_num_groups")
        cfg["norm_num_groups"] = 8
        (exp / "vqvae" / "config.json").write_text(json.dumps(cfg))
        cmd = self.refine_cmd(f, w / "out_groups", f"first_stage.f4.ckpt_path={exp / 'vqvae'}")
        p = run(cmd)
        self.add("silently wrong", f"diffusers vqvae/ config says norm_num_groups 8, windows trained on {groups}", cmd,
                 p, "refused before compute, exit 2", p.returncode == 2 and not list((w / "out_groups").glob("*.png")))
        ck = torch.load(self.window, map_location="cpu", weights_only=False)
        ck["hyper_parameters"]["scale_factor"] = float("nan")
        bad = w / "nan_scale.ckpt"
        torch.save(ck, bad)
        cmd = self.refine_cmd(f, w / "out_nan", experts=[bad])
        p = run(cmd)
        self.add("silently wrong", "a window whose scale_factor metadata is NaN", cmd, p,
                 "refused before compute, exit 2, names scale_factor",
                 p.returncode == 2 and "scale_factor" in p.stderr and not (w / "out_nan").exists())

    # ---- one bad item ----
    def one_bad_item(self) -> None:
        w = self.work / "item"
        shutil.rmtree(w, ignore_errors=True)
        f = w / "in"
        self.images(f, 10)
        Image.new("RGB", (8, 8), (120, 80, 40)).save(f / "tiny8.png")
        Image.new("RGB", (1, 1), (120, 80, 40)).save(f / "tiny1.png")
        cmd = self.refine_cmd(f, w / "out")
        p = run(cmd)
        summary = w / "out" / "summary.json"
        done = [x for x in (w / "out").glob("img*.png")] if (w / "out").exists() else []
        failed = json.loads(summary.read_text()).get("failed", []) if summary.exists() else []
        self.add("one bad item", "12 images, two of 8x8 and 1x1 px, the suite's 32 px models", cmd, p,
                 "the images that fit refined, summary.json written and lists any that failed",
                 summary.exists() and len(done) == 10 and (p.returncode == 0 or len(failed) >= 1))
        if not IS_ROOT:
            for case in ("disk full during refine", "disk full during build_shards"):
                self.add("one bad item", case, [], None, "one line naming the path, exit 1, no partial files", None)
            return
        mnt = w / "full"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(mnt)], check=True)
        try:
            cmd = self.refine_cmd(f, mnt / "out")
            p = run(cmd)
            partial = [x.name for x in (mnt / "out").rglob("*") if x.name.startswith(".")] if (mnt / "out").exists() else []
            self.add("one bad item", "disk full during refine (24 kB tmpfs)", cmd, p,
                     "one line naming the path, exit 1, no partial files",
                     p.returncode == 1 and "Traceback" not in p.stderr and not partial)
            shutil.rmtree(mnt / "out", ignore_errors=True)
            for case in ("disk fills during build_shards (24 kB tmpfs)", "build_shards onto a disk already full"):
                if "already" in case:
                    with open(mnt / "filler", "wb") as fh:  # fill what is left
                        with contextlib.suppress(OSError):
                            fh.write(b"\0" * 64 * 1024)
                cmd = self.shards_cmd(mnt / "shards")
                p = run(cmd)
                partial = [x.name for x in mnt.iterdir() if "building" in x.name]
                self.add("one bad item", case, cmd, p, "one line naming the path, exit 1, no partial output",
                         p.returncode == 1 and "Traceback" not in p.stderr and not partial
                         and not (mnt / "shards").exists())
        finally:
            subprocess.run(["umount", str(mnt)], check=False)

    # ---- signals and leftovers ----
    def signals(self) -> None:
        w = self.work / "signals"
        shutil.rmtree(w, ignore_errors=True)
        for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
            out = w / sig.name
            cmd = self.train_cmd(out, "trainer.max_steps=100000", "trainer.val_check_interval=20")
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True)
            deadline = time.time() + 300
            while time.time() < deadline and not list(out.rglob("*.ckpt")):  # the first validation (step 20) saved
                time.sleep(0.5)
            time.sleep(5)
            proc.send_signal(sig)
            try:
                _, err = proc.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            p = subprocess.CompletedProcess(cmd, proc.returncode, "", err)
            ckpts = list(out.rglob("last.ckpt"))
            step = torch.load(ckpts[0], map_location="cpu", weights_only=False)["global_step"] if ckpts else None
            self.add("signals", f"{sig.name} to a training run", cmd, p,
                     f"a resumable checkpoint, exit {code}, one line naming it and the resume command",
                     p.returncode == code and bool(ckpts) and step is not None and step > 20)
            if sig == signal.SIGTERM and ckpts:
                cmd = self.train_cmd(out, f"trainer.max_steps={step + 2}", f"ckpt_path={ckpts[0]}")
                p = run(cmd)
                after = list(out.rglob("last.ckpt"))
                step2 = torch.load(after[0], map_location="cpu", weights_only=False)["global_step"] if after else None
                self.add("signals", f"resume after SIGTERM (saved at step {step})", cmd, p,
                         f"exit 0, ends at step {step + 2}", p.returncode == 0 and step2 == step + 2)
        # SIGKILL during build_shards, then a new run
        many = w / "many"
        self.images(many, 240)
        out = w / "shards" / "train"
        out.parent.mkdir(parents=True)  # the build folder is made beside the output, in its nearest existing parent
        cmd = self.shards_cmd(out, "maxcount_per_shard=4", "batch_size=2", images=many)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and not [x for x in out.parent.glob(".*building*") if list(x.rglob("*.tar"))]:
            time.sleep(0.2)
        proc.kill()
        proc.wait()
        stale = [x.name for x in out.parent.glob(".*building*")]
        p = run(cmd)
        left = [x.name for x in out.parent.glob(".*building*")]
        self.add("signals", f"SIGKILL during build_shards ({len(stale)} stale folder), then a new run", cmd, p,
                 "the stale folder removed and said so; exit 0", bool(stale) and not left and p.returncode == 0)
        if p.returncode == 0:
            self.rows[-1].message = next((ln for ln in p.stderr.splitlines() + p.stdout.splitlines()
                                          if "stale" in ln.lower() or "removed" in ln.lower()), self.rows[-1].message)

    # ---- messages and exit codes ----
    def messages(self) -> None:
        w = self.work / "messages"
        shutil.rmtree(w, ignore_errors=True)
        f = w / "in"
        self.images(f, 2)
        one = "one error: line, exit 2"

        def check(case: str, cmd: list[str], want: str | None = None, **kw) -> None:
            p = run(cmd, **kw)
            _, n = message_of(p.stderr)
            ok = p.returncode == 2 and n == 1 and p.stderr.strip().startswith("error:")
            self.add("messages", case, cmd, p, one + (f", suggests {want}" if want else ""),
                     ok and (want is None or want in p.stderr.partition("did you mean")[2]))

        check("refine t_strat=499 (typo)", self.refine_cmd(f, w / "o1", "t_strat=499"), "t_start")
        check("train model.lr_typo=1", self.train_cmd(w / "t1", "model.lr_typo=1"), "model.")
        check("build_shards maxcount_per_shrd=3", self.shards_cmd(w / "s1", "maxcount_per_shrd=3"), "maxcount_per_shard")
        check("train trainer.max_steps=abc", self.train_cmd(w / "t2", "trainer.max_steps=abc"))
        check("train data.batch_size=0", self.train_cmd(w / "t3", "data.batch_size=0"))
        check("train trainer.max_steps=-5", self.train_cmd(w / "t4", "trainer.max_steps=-5"))
        if not torch.cuda.is_available():
            check("train trainer=gpu on a CPU machine", self.train_cmd(w / "t5", "trainer=gpu"))
            check("train trainer.accelerator=gpu trainer.devices=4 on a CPU machine",
                  self.train_cmd(w / "t6", "trainer.accelerator=gpu", "trainer.devices=4"))
        check("refine seed=99999999999999999999", self.refine_cmd(f, w / "o2", "seed=99999999999999999999"))
        check("train seed=99999999999999999999", self.train_cmd(w / "t7", "seed=99999999999999999999"))
        if not IS_ROOT:
            for case in ("unwritable working directory, writable output_dir", "unreadable checkpoint"):
                self.add("messages", case, [], None, "", None)
            return
        # as user nobody: a working directory it may not write, output_dir it may
        locked = w / "locked"
        locked.mkdir()
        os.chmod(locked, 0o555)
        free = w / "free"
        free.mkdir()
        os.chmod(free, 0o777)
        os.chmod(f, 0o755)
        os.chmod(w, 0o755)
        cmd = [*self.refine_cmd(f, free / "out", hydra_dir=False)]
        cmd[1] = str(ROOT / "refine.py")
        p = run(cmd, cwd=locked, user="nobody")
        self.add("messages", "unwritable working directory (Hydra's default run dir), writable output_dir", cmd, p,
                 "refined, exit 0", p.returncode == 0 and (free / "out" / "img00.png").exists())
        cmd = [*self.refine_cmd(f, free / "out2", hydra_dir=False), f"hydra.run.dir={locked / 'run'}"]
        cmd[1] = str(ROOT / "refine.py")
        p = run(cmd, cwd=free, user="nobody")
        self.add("messages", "unwritable hydra.run.dir, writable output_dir", cmd, p,
                 "refined (exit 0) or one error: line naming the folder",
                 (p.returncode == 0 and (free / "out2" / "img00.png").exists())
                 or (p.returncode == 2 and message_of(p.stderr)[1] == 1))
        secret = w / "secret.ckpt"
        shutil.copy(self.window, secret)
        os.chmod(secret, 0o600)
        cmd = self.refine_cmd(f, free / "out3", experts=[secret], hydra_dir=False)
        cmd[1] = str(ROOT / "refine.py")
        cmd.append(f"hydra.run.dir={free / 'run3'}")
        p = run(cmd, cwd=free, user="nobody")
        self.add("messages", "a checkpoint the user may not read", cmd, p, "'permission denied', exit 2",
                 p.returncode == 2 and "permission denied" in p.stderr.lower() and "corrupt" not in p.stderr.lower())

    # ---- file modes ----
    def modes(self) -> None:
        w = self.work / "modes"
        shutil.rmtree(w, ignore_errors=True)
        f = w / "in"
        self.images(f, 2)

        def modes_under(root: Path) -> tuple[set[str], set[str]]:
            files = {oct(stat.S_IMODE(p.stat().st_mode)) for p in root.rglob("*") if p.is_file()}
            dirs = {oct(stat.S_IMODE(p.stat().st_mode)) for p in [root, *root.rglob("*")] if p.is_dir()}
            return files, dirs

        for umask, fm, dm in ((0o022, "0o644", "0o755"), (0o077, "0o600", "0o700")):
            out = w / f"refine_{umask:03o}"
            cmd = self.refine_cmd(f, out, "grid=both")
            p = run(cmd, umask=umask)
            files, dirs = modes_under(out)
            self.add("file modes", f"refine outputs under umask {umask:03o}: files {sorted(files)}, dirs {sorted(dirs)}",
                     cmd, p, f"files {fm}, folders {dm}", p.returncode == 0 and files == {fm} and dirs == {dm})
        out = w / "train"
        cmd = self.train_cmd(out)
        p = run(cmd, umask=0o022)
        files, dirs = modes_under(out / "checkpoints") if (out / "checkpoints").exists() else (set(), set())
        self.add("file modes", f"training checkpoints under umask 022: files {sorted(files)}, dirs {sorted(dirs)}", cmd,
                 p, "files 0o644, folders 0o755", p.returncode == 0 and files == {"0o644"} and dirs == {"0o755"})
        out = w / "export"
        cmd = [PY, "-m", "refiner", "export", "diffusers", str(self.window), str(out)]
        p = run(cmd, umask=0o022)
        files, dirs = modes_under(out) if out.exists() else (set(), set())
        self.add("file modes", f"diffusers export under umask 022: files {sorted(files)}, dirs {sorted(dirs)}", cmd, p,
                 "files 0o644, folders 0o755", p.returncode == 0 and files == {"0o644"} and dirs == {"0o755"})
        st = w / "window.safetensors"
        cmd = [PY, "-m", "refiner", "export", "safetensors", str(self.window), str(st)]
        p = run(cmd, umask=0o022)
        files = {oct(stat.S_IMODE(x.stat().st_mode)) for x in w.glob("window.*")}
        self.add("file modes", f"safetensors export under umask 022: files {sorted(files)}", cmd, p, "files 0o644",
                 p.returncode == 0 and files == {"0o644"})


def markdown(rows: list[Row], header: str) -> str:
    lines = [header, "", "| class | case | exit | message (first `error:` line, else last line of stderr) | stderr lines | "
             "promise | held |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        msg = r.message.replace("|", "\\|")
        held = {True: "yes", False: "**no**", None: "not run"}[r.held]
        lines.append(f"| {r.group} | {r.case} | {r.exit} | `{msg}` | {r.stderr_lines} | {r.expected} | {held} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (the world is kept for re-runs)")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--only", nargs="*", help="groups: data_lost silently_wrong one_bad_item signals messages modes")
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    os.chmod(args.work, 0o755)
    cases = Cases(args.work)
    cases.build()
    groups = args.only or ["data_lost", "silently_wrong", "one_bad_item", "signals", "messages", "modes"]
    for g in groups:
        try:
            getattr(cases, g)()
        except Exception as err:  # a case that crashes the script is itself a finding; record it and go on
            cases.rows.append(Row(g, "(script error)", "", None, f"{type(err).__name__}: {err}"[:300], 0, "", False))
            print(f"[script error] {g}: {err!r}", flush=True)
    (args.work / "cases.json").write_text(json.dumps([asdict(r) for r in cases.rows], indent=1))
    held = sum(r.held is True for r in cases.rows)
    print(f"{held} of {len(cases.rows)} rows held ({sum(r.held is None for r in cases.rows)} not run)")
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        args.out.write_text(markdown(cases.rows, f"Commit {commit}, {time.strftime('%Y-%m-%d')}: {held} of "
                                                 f"{len(cases.rows)} rows held."))
    return 0 if all(r.held is not False for r in cases.rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

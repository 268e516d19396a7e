"""``refiner chain`` (issue 20, item 2): the demo's recipe on your own image folder, one command.

Fast: the refusals (one ``error:`` line and exit 2 before any step; they run with ``until=split``, so a refusal that
went missing shows up as exit 0 and a written split), the split, the command-line spellings, the lanes runner. Slow: a
tiny run end to end through the real commands (child processes), stopped after the VQs, continued (the VQ-f8 resumes
from its last.ckpt), then run again (every step skipped), and the printed refine command run on the user's images.
"""

from __future__ import annotations

import fcntl
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_TRAINER, compose_config
from PIL import Image
from pipeline import TINY_UNET

from refiner.apps import lanes
from refiner.apps.chain import Chain, hydra_argv, run_chain, settings
from refiner.apps.chain_plan import ChainSettings, CommandArgs, PerTraining, hydra_value
from refiner.apps.lanes import Job, JobFailed, Runner
from refiner.apps.refine import run as refine
from refiner.cli import run_cli
from refiner.data.folder_split import pick_val
from refiner.data.images import load_image, to_tensor
from refiner.data.shards import fit_size
from refiner.lit.image_data import ImageDataModule, ImageFolderDataset
from refiner.settings import from_config

pytestmark = pytest.mark.usefixtures("one_thread")


def make_images(folder: Path, n: int, size=(64, 72), small=()) -> Path:
    """``n`` PNGs of ``size`` (h, w): colour gradients with a disc, something a VQ learns a little of in a few steps;
    indices in ``small`` are 20 px high."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = (20, size[1]) if i in small else size
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        colour = rng.uniform(0, 255, (2, 3))
        img = colour[0] * yy[..., None] + colour[1] * (1 - xx[..., None])
        cy, cx, r = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, rng.uniform(0.15, 0.3) * min(h, w)
        img[(np.mgrid[0:h, 0:w][0] - cy) ** 2 + (np.mgrid[0:h, 0:w][1] - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"img_{i:03d}.png")
    return folder


def snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def refusal(capsys, fresh: bool = True, **kw) -> str:
    """Run the chain with the settings ``kw`` (plain values, as from the config; until=split); assert exit 2 with
    exactly one ``error:`` line and, for a ``fresh`` out folder, nothing written; return the line."""
    out = Path(kw.setdefault("out", "/nonexistent-should-not-be-made"))
    kw.setdefault("until", "split")
    code = run_cli(lambda: Chain(from_config(ChainSettings, kw)).run())
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert code == 2, captured.out + captured.err
    assert len(errors) == 1, captured.err
    assert not fresh or (not (out / "images").exists() and not (out / "chain.json").exists())
    return errors[0]


# ------------------------------------------------------------------------------------------------ refusals
def test_refuses_a_missing_folder_a_file_and_an_empty_folder(tmp_path, capsys):
    assert "no such folder" in refusal(capsys, data_folder=str(tmp_path / "nope"), out=str(tmp_path / "o"))
    (tmp_path / "a.png").write_bytes(b"x")
    assert "is a file, not a folder" in refusal(capsys, data_folder=str(tmp_path / "a.png"), out=str(tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    assert "is an empty folder" in refusal(capsys, data_folder=str(tmp_path / "empty"), out=str(tmp_path / "o"))
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("no images here")
    line = refusal(capsys, data_folder=str(tmp_path / "texts"), out=str(tmp_path / "o"))
    assert "holds no image files" in line and "notes.txt" in line
    assert not (tmp_path / "o").exists()


def test_refuses_too_few_images_counting_only_readable_ones(tmp_path, capsys):
    data = make_images(tmp_path / "imgs", 19)
    (data / "broken.png").write_bytes(b"not a png")
    code = run_cli(lambda: Chain(ChainSettings(data_folder=str(data), out=str(tmp_path / "o"), until="split")).run())
    err = capsys.readouterr().err
    assert code == 2
    assert any(line.startswith("unreadable (not used):") and "broken.png" in line for line in err.splitlines())
    error = next(line for line in err.splitlines() if line.startswith("error: "))
    # 19 usable (the broken file does not count), 20 needed, and why
    for needle in ("19 usable images found, 20 needed", "min_train=16", "VQ trainings' batch", "val.min=4",
                   "1 unreadable files do not count: broken.png"):
        assert needle in error, error
    assert not (tmp_path / "o").exists()


def test_refuses_images_smaller_than_size_naming_one(tmp_path, capsys):
    data = make_images(tmp_path / "imgs", 24, small=(5,))
    line = refusal(capsys, data_folder=str(data), out=str(tmp_path / "o"), size=32)
    assert "1 of 24 images are smaller than size=32" in line and "img_005.png (72x20 px)" in line, line
    line = refusal(capsys, data_folder=str(make_images(tmp_path / "big", 24)), out=str(tmp_path / "o"), size=80)
    assert "24 of 24" in line and "(72x64 px); use size=64 or remove them" in line, line


@pytest.mark.parametrize("kw, needle", [
    ({"size": 40}, "size must be a multiple of 16"),
    ({"size": 16}, "size must be in [32, inf]"),
    ({"first_stage": "compvis"}, "first_stage=compvis needs paths.vq_f4="),
    ({"first_stage": "compvis", "first_stage_files": {"f4": "/no/vq-f4.ckpt", "f8": "/no/vq-f8.ckpt"},
      "vq_paths": {"f4": "/no/vq-f4.ckpt", "f8": "/no/vq-f8.ckpt"}}, "paths.vq_f4=/no/vq-f4.ckpt not found"),
    ({"args": {"train": ["trainer.max_steps=5"]}}, "args.train may not set trainer.max_steps"),
    ({"args": {"refine": ["+inputs=x"]}}, "args.refine may not set inputs"),
    ({"args": {"windows": ["model.unet.nope=1"]}}, "unknown setting model.unet.nope"),
    ({"until": "vq_f4", "first_stage": "compvis", "first_stage_files": {"f4": __file__, "f8": __file__}},
     "until must be one of"),
    ({"max_steps": {"shape": 0}}, "max_steps.shape must be in [1, inf]"),
    ({"val": {"fraction": 0.9}}, "val.fraction must be in [0.0, 0.5]"),
])
def test_refuses_settings_that_cannot_work(tmp_path, capsys, kw, needle):
    data = make_images(tmp_path / "imgs", 20)
    line = refusal(capsys, data_folder=str(data), out=str(tmp_path / "o"), **{"until": "split", **kw})
    assert needle in line, line


def test_refuses_an_out_folder_that_is_not_a_chains_or_is_in_use(tmp_path, capsys):
    data = make_images(tmp_path / "imgs", 20)
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "thesis.tex").write_text("keep me")
    assert "holds files that are not a chain's" in refusal(capsys, data_folder=str(data), out=str(tmp_path / "theirs"))
    assert (tmp_path / "theirs" / "thesis.tex").read_text() == "keep me"
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242")
        held.flush()
        code = run_cli(lambda: Chain(ChainSettings(data_folder=str(data), out=str(out), until="split")).run())
    assert code == 2
    assert "another refiner chain is running into out=" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the split
def test_split_is_symlinks_and_resized_held_out_images_and_is_kept(tmp_path, capsys):
    data = make_images(tmp_path / "imgs", 22)
    (data / "broken.png").write_bytes(b"")
    (data / "README.txt").write_text("about my images")
    before = snapshot(data)
    out = tmp_path / "out"
    s = ChainSettings(data_folder=str(data), out=str(out), size=32, until="split")
    assert run_cli(lambda: Chain(s).run()) == 0
    assert snapshot(data) == before  # the user's folder is untouched
    train, val = sorted((out / "images" / "train").iterdir()), sorted((out / "images" / "val").iterdir())
    assert [p.name for p in val] == ["img_002.png", "img_008.png", "img_013.png", "img_019.png"]  # evenly spaced
    assert len(train) == 18 and all(p.is_symlink() and p.resolve().parent == data.resolve() for p in train + val)
    resized = sorted((out / "images" / "val_resized").iterdir())
    assert [p.name for p in resized] == [p.name for p in val]
    assert all(Image.open(p).size == (32, 32) for p in resized)
    record = json.loads((out / "chain.json").read_text())
    assert record["split"]["unreadable"] == ["broken.png"] and record["identity"]["size"] == 32
    capsys.readouterr()
    assert run_cli(lambda: Chain(s).run()) == 0
    assert "skipped: " in capsys.readouterr().out
    # another size, or a changed folder, would not match what the folder's finished steps used
    line = refusal(capsys, False, data_folder=str(data), out=str(out), size=64)
    assert "was started with size=32, this run asks size=64" in line
    make_images(tmp_path / "more", 1)
    (tmp_path / "more" / "img_000.png").rename(data / "new.png")
    line = refusal(capsys, False, data_folder=str(data), out=str(out), size=32)
    assert "changed since" in line and "1 images added" in line and "new.png" in line


def test_pick_val_is_spread_and_clamped():
    assert pick_val(20, 0.05, 4, 64) == [2, 7, 12, 17]
    picks = pick_val(1500, 0.05, 4, 64)
    assert len(picks) == 64 and picks[0] == 11 and picks[-1] == 1488 and picks == sorted(set(picks))
    assert pick_val(1500, 0.05, 4, 64) == picks


def test_budgets_and_validation_intervals_match_the_demo():
    s = ChainSettings(data_folder="x")
    assert [s.budget(n) for n in ("vq_f4", "vq_f8", "shape", "detail", "full_range")] == [800, 300, 1000, 600, 1600]
    assert [s.interval(n) for n in ("vq_f4", "vq_f8", "shape", "detail", "full_range")] == [400, 150, 250, 200, 200]
    tiny = ChainSettings(data_folder="x", scale=0.01)
    for name in ("vq_f4", "vq_f8", "shape", "detail", "full_range"):
        assert tiny.budget(name) % tiny.interval(name) == 0  # the last validation (and last.ckpt) is the last step
    assert tiny.budget("full_range") == tiny.budget("shape") + tiny.budget("detail") == 16


# ------------------------------------------------------------------------------------------------ the command line
def test_command_line_spellings_compose(tmp_path):
    argv = hydra_argv(["data=my/images", "args.train=[trainer=cpu,model.unet.channel_mult=[1,2]]",
                       "args.refine=['batch_size=2']", "size=32"])
    assert argv == ["data_folder=my/images", 'args.train=["trainer=cpu","model.unet.channel_mult=[1,2]"]',
                    "args.refine=['batch_size=2']", "size=32"]
    s = settings(compose_config("chain", argv, tmp_path))
    assert s.data_folder == "my/images" and s.size == 32 and s.first_stage == "demo"
    assert s.args.train == ("trainer=cpu", "model.unet.channel_mult=[1,2]") and s.args.refine == ("batch_size=2",)
    assert [hydra_value(v) for v in ("out/x/last.ckpt", "my photos", "123", "it's")] == [
        "out/x/last.ckpt", "'my photos'", "'123'", "'it\\'s'"]


def test_cli_checks_every_steps_command_line_inside_its_hydra_run(tmp_path):
    """Through ``python -m refiner chain``: the ``data=`` and ``args.*=[k=v]`` spellings, each step's command line
    composed inside the chain's own Hydra run, one ``error:`` line, exit 2, and nothing written anywhere."""
    data = make_images(tmp_path / "imgs", 20)
    proc = subprocess.run([sys.executable, "-m", "refiner", "chain", f"data={data}", f"out={tmp_path / 'o'}",
                           "args.windows=[model.unet.nope=1,trainer.max_epochs=-1]"], check=False, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == [
        "error: unknown setting model.unet.nope (add a new key with +model.unet.nope=...)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]  # no out, no Hydra folder, no log


def test_vq_images_are_resized_as_the_shards_hold_them(tmp_path):
    data = make_images(tmp_path / "imgs", 1)
    files = sorted(data.iterdir())
    val = ImageFolderDataset(files, crop_size=32, train=False, size=32)[0]["image"]
    assert torch.equal(val, to_tensor(fit_size(load_image(files[0]), 32, 8, "crop")[0]))
    assert ImageFolderDataset(files, crop_size=32, train=True)[0]["image"].shape == (3, 32, 32)  # a crop of 64x72
    with pytest.raises(ValueError, match="multiple of 8"):
        ImageDataModule(str(data), str(data), crop_size=32, size=36)


# ------------------------------------------------------------------------------------------------ the runner
def test_lanes_run_side_by_side_and_a_failure_stops_only_its_lane(tmp_path):
    runner = Runner(tmp_path / "logs", say=lambda line: None)
    times = runner.run_lanes([[Job("a", ["--help"]), Job("b", ["--help"])], [Job("c", ["--help"])]], threads=1)
    assert sorted(times) == ["a", "b", "c"]
    log = (tmp_path / "logs" / "a.log").read_text()
    assert "-m refiner --help" in log and "usage: refiner <command>" in log
    with pytest.raises(JobFailed) as failed:
        runner.run_lanes([[Job("bad", ["no-such-command"]), Job("after", ["--help"])], [Job("ok", ["--help"])]])
    assert failed.value.job.name == "bad" and failed.value.code == 2
    assert not (tmp_path / "logs" / "after.log").exists() and (tmp_path / "logs" / "ok.log").exists()


def test_an_interrupt_stops_the_running_children(tmp_path, monkeypatch):
    monkeypatch.setattr(lanes, "command_line", lambda argv: [sys.executable, "-c", "import time; time.sleep(120)"])
    started = []

    def say(line):
        if "started: second" in line:
            raise KeyboardInterrupt

    class Recording(Runner):
        def _start(self, job, threads):
            proc, t = super()._start(job, threads)
            started.append(proc)
            return proc, t

    runner = Recording(tmp_path / "logs", say=say)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        runner.run_lanes([[Job("first", [])], [Job("second", [])]])
    assert len(started) == 1 and started[0].poll() is not None and time.monotonic() - t0 < 60
    assert runner.running == []


# ------------------------------------------------------------------------------------------------ end to end
TINY_ARGS = CommandArgs(
    train=tuple(o for o in TINY_TRAINER if not o.startswith(("trainer.max_steps", "trainer.val_check_interval"))),
    vq=("data.batch_size=4",), windows=tuple(TINY_UNET))


@pytest.mark.slow
def test_tiny_chain_stops_resumes_skips_and_its_refine_command_works(tmp_path, capsys):
    data = make_images(tmp_path / "my photos", 22)  # a space: every path goes through Hydra quoting
    before = snapshot(data)
    out = tmp_path / "chain out"
    kw = {"data_folder": str(data), "out": str(out), "size": 32, "args": TINY_ARGS,
          "validations": PerTraining(2, 2, 1, 1, 1)}

    # 1. stop after the VQs, the VQ-f8 short of what the next run asks
    first = ChainSettings(**kw, max_steps=PerTraining(4, 2, 4, 2), until="vq_f8")
    assert run_cli(lambda: Chain(first).run()) == 0
    text = capsys.readouterr().out
    assert "stopped after vq_f8" in text and not (out / "shards").exists()

    # 2. continue: VQ-f4 skipped, VQ-f8 resumed from its last.ckpt, the rest run
    full = ChainSettings(**kw, max_steps=PerTraining(4, 4, 4, 2))
    assert run_cli(lambda: Chain(full).run()) == 0, capsys.readouterr()
    text = capsys.readouterr().out
    assert f"skipped: {out / 'vq_f4/checkpoints/last.ckpt'} is at step 4 of 4" in text
    assert f"resuming from {out / 'vq_f8/checkpoints/last.ckpt'} (step 2 of 4)" in text
    assert "ckpt_path=" in (out / "logs" / "vq_f8.log").read_text()
    steps = {n: torch.load(out / n / "checkpoints/last.ckpt", weights_only=False)["global_step"]
             for n in ("vq_f4", "vq_f8", "shape", "detail")}
    assert steps == {"vq_f4": 4, "vq_f8": 4, "shape": 4, "detail": 2}
    assert (out / "shards/train/manifest.json").is_file() and (out / "shards/val/manifest.json").is_file()
    summary = json.loads((out / "refined" / "summary.json").read_text())
    assert len(summary["processed"]) == 4 and not summary["failed"]
    assert (out / "refined" / "grid.png").is_file()
    record = json.loads((out / "chain.json").read_text())
    assert set(record["steps"]) == {"vq_f4", "vq_f8", "shards", "shape", "detail", "refine"}
    command = text.strip().splitlines()[-1].strip()
    assert command == record["refine_command"] and command.startswith("refiner refine ")

    # 3. again: everything skipped, nothing run
    assert run_cli(lambda: Chain(full).run()) == 0
    text = capsys.readouterr().out
    assert text.count("skipped: ") == 7 and "finished: " not in text
    assert snapshot(data) == before

    # 4. the printed command refines the user's own images with this chain
    args = [a.replace("path/to/your/images", str(data / "img_000.png")).replace("=refined", f"={tmp_path / 'mine'}")
            for a in shlex.split(command)[2:]]
    result = refine(compose_config("refine", args, tmp_path / "mine"))
    assert [Path(p["output"]).name for p in result["processed"]] == ["img_000.png"] and not result["failed"]


@pytest.mark.slow  # a real step: about 30 s on the shared machine
def test_a_failing_step_shows_its_log_and_exits_1(tmp_path, capsys):
    data = make_images(tmp_path / "imgs", 20)
    s = ChainSettings(data_folder=str(data), out=str(tmp_path / "out"), size=32, until="vq_f4",
                      # a step that crashes (a callback whose construction raises FileNotFoundError; a setting error
                      # such as +trainer.no_such_argument=1 is now the step's one-line exit 2, and the chain's)
                      args=CommandArgs(train=("+callbacks.boom._target_=builtins.open",
                                              f"+callbacks.boom.file={tmp_path / 'missing' / 'boom.txt'}")))
    code = run_chain(lambda: s)
    err = capsys.readouterr().err
    assert code == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: step vq_f4 failed (exit code 1)"), err
    assert "  | " in err and "boom.txt" in err  # the end of the step's log, marked

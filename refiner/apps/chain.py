"""``refiner chain data=<image folder>`` (``make chain DATA=...``): the demo's recipe on your own images, end to end.

Settings: ``conf/chain.yaml`` (:class:`ChainSettings`, one field per key); reference: ``docs/reference/chain.md``.

1. Everything is checked before any step runs (:meth:`Chain.prepare`): the settings, the first-stage files, the output
   folder (new, or one an earlier ``refiner chain`` on the same folder with the same size, split and first stage
   made; locked while this run uses it), the image folder (every image decoded once: unreadable ones are listed and
   left out, images smaller than ``size`` and too few images are refused), and every step's command line (composed
   as its command will compose it). A problem is one ``error:`` line and exit 2.
2. The split is written as symlinks (``<out>/images/{train,val}``), the held-out images also at ``size`` x ``size``
   (``<out>/images/val_resized``, the refine step's inputs), and recorded in ``<out>/chain.json``.
3. Each step then runs its command (``python -m refiner train|build-shards|refine``, :mod:`refiner.apps.lanes`) with
   overrides that point it into ``<out>``; a finished step is skipped with one line saying why, and a training whose
   ``last.ckpt`` is short of its budget resumes from it (``ckpt_path=``).
4. At the end it prints the ``refiner refine`` command for your own images with this chain.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from refiner.apps.chain_plan import RECORD, TITLES, TRAININGS, ChainSettings, Layout, Plan, check_commands
from refiner.apps.hydra_app import hydra_command
from refiner.apps.lanes import Job, JobFailed, Runner, Timing, duration, run_interruptible, tail
from refiner.cli import run_cli
from refiner.data.folder_split import link_split, pick_val, survey_folder, write_resized
from refiner.data.images import scan_images
from refiner.data.shards import MANIFEST
from refiner.errors import SettingError
from refiner.io import atomic_write_text
from refiner.settings import check_writable_dir, from_config


# ------------------------------------------------------------------------------------------------ checks
def check_exists(s: ChainSettings) -> Path:
    """The image folder exists and is a folder."""
    folder = Path(s.data_folder)
    if not folder.exists():
        raise SettingError(f"data={folder}: no such folder (relative paths are relative to {os.getcwd()})")
    if not folder.is_dir():
        raise SettingError(f"data={folder} is a file, not a folder: give the folder that holds your images")
    return folder


def warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def check_folder(s: ChainSettings) -> tuple[list[Path], list[Path], dict]:
    """Survey the image folder and split it: (train, val, the split's record). Refuses an empty folder, too few usable
    images and images smaller than ``size``; lists the unreadable ones on stderr (they do not count)."""
    folder = check_exists(s)
    entries = sorted(folder.iterdir())
    if not entries:
        raise SettingError(f"data={folder} is an empty folder")
    try:
        survey = survey_folder(folder, s.size)
    except ValueError:
        sub = next((e for e in entries if e.is_dir()), None)
        raise SettingError(f"data={folder} holds no image files ({len(entries)} other entries, e.g. "
                           + (f"{sub.name}/: subfolders are not searched)" if sub else f"{entries[0].name})")) from None
    for _, reason in survey.unreadable[:20]:
        warn(f"unreadable (not used): {reason}")
    if len(survey.unreadable) > 20:
        warn(f"unreadable (not used): ... and {len(survey.unreadable) - 20} more")
    if survey.small:
        (path, (w, h)), fits = survey.small[0], min(min(wh) for _, wh in survey.small) // 16 * 16
        hint = f"use size={fits} or remove them" if fits >= 32 else "remove them (size is at least 32)"
        raise SettingError(f"data={folder}: {len(survey.small)} of {len(survey.small) + len(survey.usable)} images "
                           f"are smaller than size={s.size} on their short side, e.g. {path.name} ({w}x{h} px); {hint}")
    n, needed = len(survey.usable), s.min_train + s.val.min
    if n < needed:
        bad = (f"; {len(survey.unreadable)} unreadable files do not count: "
               + ", ".join(p.name for p, _ in survey.unreadable[:5]) if survey.unreadable else "")
        raise SettingError(
            f"data={folder}: {n} usable images found, {needed} needed: min_train={s.min_train} to train on (the VQ "
            f"trainings' batch; their loader drops an incomplete batch, so fewer give no step) + val.min={s.val.min} "
            f"held out for validation and the final grid{bad}")
    held = set(pick_val(n, s.val.fraction, s.val.min, min(s.val.max, n - s.min_train)))
    train = [p for i, p in enumerate(survey.usable) if i not in held]
    val = [p for i, p in enumerate(survey.usable) if i in held]
    record = {"train": [p.name for p in train], "val": [p.name for p in val],
              "unreadable": [p.name for p, _ in survey.unreadable], "ignored": len(survey.ignored)}
    return train, val, record


def check_out(s: ChainSettings, layout: Layout) -> dict | None:
    """The output folder: writable, and new/empty or an earlier chain's with the same identity. Returns its record
    (None for a new folder)."""
    out = layout.out
    check_writable_dir(out, "out")
    record_path = out / RECORD
    if not record_path.is_file():
        others = [e.name for e in out.iterdir() if e.name != ".lock"] if out.is_dir() else []
        if others:
            raise SettingError(f"out={out} holds files that are not a chain's (no {RECORD}; e.g. {others[0]}): "
                               "choose a new or empty folder")
        return None
    record = json.loads(record_path.read_text())
    for key, value in s.identity().items():
        if record.get("identity", {}).get(key) != value:
            was = record.get("identity", {}).get(key)
            raise SettingError(f"out={out} was started with {key}={json.dumps(was)}, this run asks "
                               f"{key}={json.dumps(value)}: choose another out= (or delete {out} to start over)")
    split = record.get("split")
    if split and layout.held_out.is_dir():
        try:
            now = {p.name for p in scan_images(str(check_exists(s)))[0]}
        except ValueError:
            now = set()
        known = set(split["train"]) | set(split["val"]) | set(split["unreadable"])
        if now != known:
            added, gone = sorted(now - known), sorted(known - now)
            raise SettingError(
                f"data={s.data_folder} changed since out={out} was split ({len(added)} images added, {len(gone)} "
                f"gone, e.g. {(added or gone)[0]}): its finished steps used the old split; choose another out= (or "
                f"delete {out} to start over)")
    return record


def lock(out: Path):
    """Hold ``out/.lock`` for the life of this process; another chain running into ``out`` is an error."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".lock", "a+")  # noqa: SIM115 (held open, and locked, until the process ends)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        raise SettingError(f"another refiner chain is running into out={out} (pid {handle.read().strip() or '?'})")
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


# ------------------------------------------------------------------------------------------------ run
class Chain:
    """One run of the recipe: :meth:`run` goes through the steps, printing one header a step."""

    def __init__(self, s: ChainSettings, say=print):
        self.s, self.say = s, say
        out = Path(s.out) if s.out else Path("outputs/chain") / Path(s.data_folder).resolve().name
        self.layout = Layout(out)
        self.plan = Plan(s, self.layout)
        self.steps = s.steps()[: s.steps().index(s.until) + 1] if s.until else s.steps()
        self.runner = Runner(self.layout.logs, say)
        self.record: dict = {}

    def header(self, name: str) -> None:
        self.say(f"\n==> [{self.steps.index(name) + 1}/{len(self.steps)}] {TITLES[name]}")

    def save(self) -> None:
        atomic_write_text(self.layout.out / RECORD, json.dumps(self.record, indent=2) + "\n")

    def ran(self, times: dict[str, Timing]) -> None:
        for name, timing in times.items():
            self.record.setdefault("steps", {})[name] = {
                "seconds": round(timing.wall, 1), "cpu_seconds": round(timing.cpu, 1),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                **({"max_steps": self.s.budget(name)} if name in TRAININGS else {})}
        self.save()

    def prepare(self) -> None:
        """Every check (module docstring, 1.); then the record and, if new, the split."""
        s, layout = self.s, self.layout
        record = check_out(s, layout)
        have_split = bool(record and record.get("split") and layout.held_out.is_dir())
        split = None if have_split else check_folder(s)
        check_commands(self.plan)
        self._lock = lock(layout.out)
        self.record = record or {"identity": s.identity()}
        self.save()
        self.header("split")
        if split is None:
            n = self.record["split"]
            self.say(f"    skipped: {layout.images} holds the split ({len(n['train'])} train, {len(n['val'])} val)")
            return
        train, val, self.record["split"] = split
        if layout.images.exists():  # an earlier run was killed before recording its split
            shutil.rmtree(layout.images)
        link_split(layout.images, train, val)
        write_resized(layout.held_out, val, s.size)
        self.save()
        self.say(f"    {len(train)} train, {len(val)} held-out images: symlinks in {layout.images}/{{train,val}}; "
                 f"the held-out ones at {s.size}x{s.size} (as the shards hold them) in {layout.held_out}")

    def training_job(self, name: str) -> Job | None:
        """Print what happens to a training; its job, or None when it is done."""
        state, step = self.plan.training_state(name)
        last, budget = self.layout.last(name), self.s.budget(name)
        if state == "done":
            self.say(f"    skipped: {last} is at step {step} of {budget}")
            return None
        if state == "resume":
            self.say(f"    resuming from {last} (step {step} of {budget}); log: {self.runner.log_of(Job(name, []))}")
            return Job(name, self.plan.train(name, resume=last))
        self.say(f"    {budget} steps; log: {self.runner.log_of(Job(name, []))}")
        return Job(name, self.plan.train(name))

    def sequential(self, name: str) -> None:
        self.header(name)
        job = self.training_job(name)
        if job is not None:
            self.ran(self.runner.run_lanes([[job]]))

    def shards(self) -> None:
        self.header("shards")
        missing = self.plan.missing_shards()
        if not missing:
            self.say(f"    skipped: {self.layout.shards}/{{train,val}}/{MANIFEST} exist")
            return
        self.say(f"    {' and '.join(missing)} at {self.s.size}x{self.s.size}; log: {self.layout.logs}/shards.log")
        self.ran(self.runner.run_lanes([[Job("shards", self.plan.shards(missing))]]))

    def trainings(self) -> None:
        """Shape then detail in one lane, the full-range model in another (side by side with ``parallel``)."""
        lanes: list[list[Job]] = [[], []]
        for lane, name in ((0, "shape"), (0, "detail"), (1, "full_range")):
            if name in self.steps:
                self.header(name)
                job = self.training_job(name)
                lanes[lane if self.s.parallel else 0] += [job] if job else []
        lanes = [lane for lane in lanes if lane]
        if len(lanes) > 1:
            self.say("    the experts and the full-range model train side by side, one thread each")
        if lanes:
            self.ran(self.runner.run_lanes(lanes, threads=1 if len(lanes) > 1 else None))

    def refine(self) -> None:
        self.header("refine")
        jobs = []
        for full_range in (False, True) if self.s.full_range else (False,):
            name = "refine_full_range" if full_range else "refine"
            out = self.layout.refined(full_range)
            state = self.plan.refine_state(full_range)
            if state == "done":
                self.say(f"    skipped: {out}/summary.json is newer than the experts")
                continue
            what = "the full-range model" if full_range else "the chain"
            self.say(f"    {len(self.record['split']['val'])} held-out images through {what}, preset={self.s.preset}"
                     f"{' (its experts changed: refining again)' if state == 'stale' else ''}; "
                     f"log: {self.layout.logs}/{name}.log")
            jobs.append(Job(name, self.plan.refine(full_range, overwrite=state == "stale")))
        for job in jobs:
            self.ran(self.runner.run_lanes([[job]]))

    def run(self) -> int:
        started = time.monotonic()
        self.prepare()
        for name in self.steps[1:]:
            if name in ("vq_f4", "vq_f8"):
                self.sequential(name)
            elif name == "shards":
                self.shards()
            elif name == "shape":
                self.trainings()
            elif name == "refine":
                self.refine()
        self.finish(time.monotonic() - started)
        return 0

    def finish(self, seconds: float) -> None:
        L, say = self.layout, self.say
        if self.steps[-1] != "refine":
            say(f"\nstopped after {self.steps[-1]} (until={self.s.until}) in {duration(seconds)}; run without until= "
                "to continue")
            return
        command = shlex.join(["refiner", *self.plan.refine_args("path/to/your/images", "refined")])
        self.record["refine_command"] = command
        self.record["experts"] = [str(p) for p in self.plan.experts()]
        self.save()
        say(f"\nchain finished in {duration(seconds)}: {L.out}")
        say(f"  experts: {'  '.join(self.record['experts'])}")
        say(f"  grid:    {L.refined() / 'grid.png'} (input | after each expert, held-out images)")
        if self.s.full_range:
            say(f"  full-range model: {L.last('full_range')}; its grid: {L.refined(True) / 'grid.png'}")
        say(f"\nrefine your own images with this chain (path/to/your/images: a folder, a glob or a file; refined: "
            f"where the outputs go):\n  {command}")


def settings(cfg: DictConfig) -> ChainSettings:
    """The run's typed settings (the one conversion from config). ``first_stage`` is the option of the
    ``first_stage`` group Hydra chose (``demo`` when the config was composed without a Hydra run)."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    plain = {key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
             for key, value in cfg.items() if key not in ("paths", "task_name", "first_stage")}
    plain.update(first_stage=choices.get("first_stage", "demo"),
                 first_stage_files={n: OmegaConf.select(cfg, f"first_stage.{n}.ckpt_path") for n in ("f4", "f8")},
                 vq_paths={n: OmegaConf.select(cfg, f"paths.vq_{n}") for n in ("f4", "f8")})
    return from_config(ChainSettings, plain)


def run_chain(settings_of: Callable[[], ChainSettings]) -> int:
    """The recipe with the settings ``settings_of()`` gives, under the exit-code contract: 0 done, 1 a step failed
    (the end of its log on stderr), 2 a setting or folder that cannot work (before any step) or a step that refused
    one, 130 interrupted (SIGTERM is turned into an interrupt, which stops the running steps)."""
    def body() -> int:
        try:
            return run_cli(lambda: Chain(settings_of()).run())
        except JobFailed as err:
            print("\n".join(f"  | {line}" for line in tail(err.log).splitlines()), file=sys.stderr)
            print(f"error: step {err.job.name} failed (exit code {err.code}); the end of its log {err.log} is above "
                  "(| lines). Fix the cause and re-run the same command: finished steps are skipped", file=sys.stderr,
                  flush=True)
            return 2 if err.code == 2 else 1

    return run_interruptible(body, "re-run the same command to continue (finished steps are skipped, a training "
                                   "resumes from its last.ckpt)")


def run(cfg: DictConfig) -> int:
    """:func:`run_chain` on this config."""
    return run_chain(lambda: settings(cfg))


def task(cfg: DictConfig) -> None:
    """The Hydra task."""
    raise SystemExit(run(cfg))


_command = hydra_command("chain", task)


def split_list(text: str) -> list[str]:
    """``a=1,b=[2,3]`` -> ``["a=1", "b=[2,3]"]``: split at the commas outside brackets and quotes."""
    items, depth, quote, current = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(current)
            current = ""
            continue
        current += ch
    return [*items, current] if current or items else []


def hydra_argv(argv: list[str]) -> list[str]:
    """The chain's own spellings made Hydra's: ``data=<folder>`` is ``data_folder=<folder>`` (``data`` is also a config
    group in ``conf/``, so Hydra would read it as a choice of ``conf/data/``), and in ``args.<group>=[k=v,...]`` each
    override is quoted (Hydra refuses an unquoted ``=`` inside a list)."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key == "data":
            arg = f"data_folder={value}"
        elif sep and key.startswith("args.") and value.startswith("[") and value.endswith("]") \
                and not any(q in value for q in "'\""):
            arg = f"{key}=[" + ",".join(f'"{item}"' for item in split_list(value[1:-1])) + "]"
        out.append(arg)
    return out


def main():
    """``refiner chain``: :func:`hydra_argv` on the command line, then the Hydra command."""
    sys.argv = [sys.argv[0], *hydra_argv(sys.argv[1:])]
    return _command()


if __name__ == "__main__":
    main()

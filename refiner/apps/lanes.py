"""Run ``python -m refiner <command> ...`` as child processes: one after another, or in lanes side by side (each lane's
jobs in order, the lanes at once, one CPU thread each), every job's output appended to its own log file.

Why child processes and not the commands' functions in this process: each job is then exactly the command a user could
run by hand (its first log line is that command), with its own Hydra run and Lightning state; lanes can run side by
side; and a job that crashes or is killed leaves the caller able to report it and a re-run able to resume it.

An interrupt (Ctrl-C, or SIGTERM turned into one by the caller) stops every running child (SIGTERM, then SIGKILL after
a grace period) before it propagates; on Linux a child also gets SIGTERM if this process dies without that chance
(``PR_SET_PDEATHSIG``), so no training goes on writing into a folder a re-run is about to use.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

GRACE_SECONDS = 30  # SIGTERM -> SIGKILL


@dataclass
class Job:
    """``name``: its log is ``<logs>/<name>.log``; ``argv``: the arguments after ``python -m refiner``."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


class JobFailed(Exception):
    """A job exited with a non-zero code; ``code`` is its exit code and ``log`` its log file."""

    def __init__(self, job: Job, code: int, log: Path):
        self.job, self.code, self.log = job, code, log
        super().__init__(f"{job.name} failed (exit code {code}); its log: {log}")


@dataclass(frozen=True)
class Timing:
    """A finished job's wall time and CPU time (user + system, its own and its children's), in seconds. On a machine
    others share, the CPU time is the steadier measure of the work."""

    wall: float
    cpu: float


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def command_line(argv: Sequence[str]) -> list[str]:
    """The child's full command line."""
    return [sys.executable, "-m", "refiner", *argv]


def duration(seconds: float) -> str:
    """``'4 min 12 s'``, ``'37 s'``, ``'1 h 02 min'``."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Runner:
    """Runs jobs with their output in ``logs/<name>.log``; ``say`` prints one progress line."""

    def __init__(self, logs: Path, say: Callable[[str], None] = print, poll_seconds: float = 0.2):
        self.logs, self.say, self.poll_seconds = Path(logs), say, poll_seconds
        self.running: list[subprocess.Popen] = []

    def log_of(self, job: Job) -> Path:
        return self.logs / f"{job.name}.log"

    def _start(self, job: Job, threads: int | None) -> tuple[subprocess.Popen, float]:
        self.logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **job.env}
        if threads is not None:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        cmd = command_line(job.argv)
        with open(self.log_of(job), "a", encoding="utf-8") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')}\n$ {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    preexec_fn=_die_with_parent)  # noqa: PLW1509 (no threads here)
        self.running.append(proc)
        return proc, time.monotonic()

    def run_lanes(self, lanes: Sequence[Sequence[Job]], threads: int | None = None) -> dict[str, Timing]:
        """Run each lane's jobs in order, the lanes side by side (``threads`` CPU threads per job; None: the
        machine's default). Returns each job's :class:`Timing` (its CPU time: the growth of this process's reaped
        children's usage when it was reaped, which is its alone, as jobs are reaped one at a time). When a job fails
        its lane stops; the other lanes finish, then :class:`JobFailed` is raised for the first failure."""
        queues = [deque(lane) for lane in lanes if lane]
        active: list[tuple[Job, subprocess.Popen, float] | None] = [None] * len(queues)
        times: dict[str, Timing] = {}
        cpu = _children_cpu()
        failures: list[JobFailed] = []
        try:
            while any(queues) or any(active):
                for i, queue in enumerate(queues):
                    if active[i] is None and queue:
                        job = queue.popleft()
                        if len(queues) > 1:
                            self.say(f"    started: {job.name} (log: {self.log_of(job)})")
                        active[i] = (job, *self._start(job, threads))
                    entry = active[i]
                    if entry is None or entry[1].poll() is None:
                        continue
                    job, proc, started = entry
                    self.running.remove(proc)
                    now = _children_cpu()
                    used, cpu = now - cpu, now
                    active[i] = None
                    if proc.returncode != 0:
                        failures.append(JobFailed(job, proc.returncode, self.log_of(job)))
                        queue.clear()
                        continue
                    times[job.name] = Timing(time.monotonic() - started, used)
                    self.say(f"    finished: {job.name} in {duration(times[job.name].wall)} (CPU time "
                             f"{duration(used)})")
                time.sleep(self.poll_seconds)
        except BaseException:
            self.stop_all()
            raise
        if failures:
            raise failures[0]
        return times

    def stop_all(self) -> None:
        """SIGTERM every running child, SIGKILL what is left after the grace period, and reap them."""
        for proc in self.running:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + GRACE_SECONDS
        for proc in self.running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.running.clear()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_interruptible(body: Callable[[], int], hint: str) -> int:
    """``body()`` with SIGTERM turned into an interrupt (which stops the running jobs, see the module docstring);
    on an interrupt, print ``interrupted: <hint>`` and return 130."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return body()
    except KeyboardInterrupt:
        print(f"\ninterrupted: {hint}", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def resume_command(command: str, argv: Sequence[str]) -> str:
    """``refiner <command> <argv>`` with ``resume=true`` (replacing any ``resume=``), quoted for a shell."""
    args = [a for a in argv if not a.lstrip("+").startswith("resume=")]
    return shlex.join(["refiner", command, *args, "resume=true"])


"""Issue 9, class 6: every entry point reports setting errors as one `error:` line with exit 2, failed inputs
with exit 1, never a traceback."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config

from refiner.cli import run_cli
from refiner.errors import InputsFailed, SettingError

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def _cli(args, tmp_path, prefix=()):
    proc = subprocess.run([*prefix, sys.executable, *args, f"hydra.run.dir={tmp_path / 'hydra'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=ENV)
    return proc.returncode, proc.stderr


def _assert_one_error_line(stderr: str, *needles: str):
    assert "Traceback" not in stderr, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-2000:]
    assert all(n in errors[0] for n in needles), errors[0]


def test_run_cli_maps_errors_to_exit_codes(capsys):
    def raises(err):
        def body():
            raise err
        return body

    assert run_cli(lambda: None) == 0 and run_cli(lambda: 1) == 1
    assert run_cli(raises(SettingError("bad\nsetting"))) == 2
    assert run_cli(raises(PermissionError(13, "Permission denied", "/x/y"))) == 2
    assert run_cli(raises(InputsFailed("no readable images"))) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: bad setting", "error: /x/y: Permission denied", "error: no readable images"]
    with pytest.raises(KeyError):  # a bug keeps its traceback
        run_cli(raises(KeyError("bug")))


def test_sample_output_dir_that_is_a_file_exits_2(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    code, err = _cli(["refine.py", f"inputs={tmp_path}", f"output_dir={tmp_path / 'taken'}"], tmp_path)
    assert code == 2
    _assert_one_error_line(err, "output_dir", "is an existing file")


@pytest.mark.parametrize("device, message", [("bogus", "is not a torch device"), ("cuda", "CUDA is not available"),
                                             ("cuda:0", "CUDA is not available")])
def test_sample_unusable_device_is_a_setting_error(tmp_path, device, message):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from refiner.apps.refine import run

    cfg = compose_config("refine", [f"inputs={tmp_path}", f"device={device}", f"output_dir={tmp_path / 'o'}"], tmp_path)
    assert run_cli(lambda: run(cfg)) == 2
    with pytest.raises(SettingError, match=message):
        run(cfg)


def test_sample_device_bogus_cli_exits_2(tmp_path):
    code, err = _cli(["refine.py", f"inputs={tmp_path}", "device=bogus", f"output_dir={tmp_path / 'o'}"], tmp_path)
    assert code == 2
    _assert_one_error_line(err, "device='bogus'")


def _drop_override_rights() -> list[str]:
    """A setpriv prefix that runs the child as root without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, so file
    modes apply to it; [] if we are not root (modes apply anyway)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and setpriv is not installed: cannot drop the override rights")
    probe = Path(tempfile.mkdtemp())
    try:
        (probe / "ro").mkdir(mode=0o555)
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
        ok = subprocess.run([*prefix, sys.executable, "-c", f"open('{probe / 'ro' / 'x'}', 'w')"],
                            capture_output=True).returncode != 0
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    if not ok:
        pytest.skip("setpriv could not drop CAP_DAC_OVERRIDE here (container without that capability control)")
    return prefix


def test_sample_unwritable_output_folder_exits_2(tmp_path):
    prefix = _drop_override_rights()
    out = tmp_path / "readonly"
    out.mkdir(mode=0o555)
    try:
        code, err = _cli(["refine.py", f"inputs={tmp_path}", f"output_dir={out}"], tmp_path, prefix)
        assert code == 2
        _assert_one_error_line(err, str(out), "is not writable")
        code, err = _cli(["refine.py", f"inputs={tmp_path}", f"output_dir={out / 'new' / 'deeper'}"], tmp_path, prefix)
        assert code == 2
        _assert_one_error_line(err, "cannot be created", "is not writable")
    finally:
        out.chmod(0o755)


def test_train_setting_errors_exit_2_without_traceback(tmp_path):
    code, err = _cli(["train.py", "window.t_min=500", "window.t_max=250", "logger=none"], tmp_path)
    assert code == 2
    _assert_one_error_line(err, "inverted")


def test_train_empty_shard_folder_is_a_setting_error(tmp_path, capsys):
    from refiner.apps.train import run

    (tmp_path / "empty").mkdir()
    cfg = compose_config("train", ["logger=none", f"data.train_shards={tmp_path / 'empty'}", "model.first_stage=null"],
                         tmp_path / "run")
    assert run_cli(lambda: run(cfg)) == 2
    _assert_one_error_line(capsys.readouterr().err, "contains no .tar shards")


def test_build_shards_setting_errors_exit_2_before_anything_is_written(tmp_path):
    code, err = _cli(["build_shards.py", f"splits.train.images={tmp_path / 'missing'}",
                      f"splits.train.out={tmp_path / 'out'}", "~splits.val"], tmp_path)
    assert code == 2
    _assert_one_error_line(err, "splits.train.images", "does not exist")
    assert not (tmp_path / "out").exists()


# ---- issue 21, item 6: Hydra's own failures follow the contract too


def _fake_shards(tmp_path: Path) -> Path:
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "shard-000000.tar").write_bytes(b"")  # never read: every case fails while building the trainer
    return folder


@pytest.mark.parametrize("overrides, needles", [
    (["trainer.max_steps=abc"], ["trainer.max_steps='abc'", "expected int"]),
    (["+trainer.max_step=3"], ["unknown setting trainer.max_step", "did you mean trainer.max_steps"]),
    (["data.batch_size=0"], ["data:", "batch_size"]),
    (["trainer.max_steps=-5"], ["trainer:", "max_steps"]),
    (["trainer=gpu"], ["trainer.accelerator=gpu", "CUDA is not available"]),
    (["trainer.accelerator=gpu", "trainer.devices=4"], ["trainer.accelerator=gpu", "CUDA is not available"]),
    (["seed=99999999999999999999"], ["seed", "[0, 4294967295]"]),
])
def test_train_settings_rejected_while_instantiating_exit_2(tmp_path, capsys, overrides, needles):
    if "gpu" in " ".join(overrides) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from refiner.apps.train import run

    cfg = compose_config("train", ["logger=none", "model.first_stage=null", "model.scale_factor=1.0",
                                   f"data.train_shards={_fake_shards(tmp_path)}", *overrides], tmp_path / "run")
    assert run_cli(lambda: run(cfg)) == 2
    _assert_one_error_line(capsys.readouterr().err, *needles)


def test_hydra_typo_names_the_nearest_key(monkeypatch, capsys):
    from refiner.apps import train

    monkeypatch.setattr(sys, "argv", ["train.py", "model.lr_typo=1"])
    with pytest.raises(SystemExit) as exit_:
        train.main()
    assert exit_.value.code == 2
    _assert_one_error_line(capsys.readouterr().err, "unknown setting model.lr_typo", "model.base_lr")


@pytest.mark.parametrize("override, needle", [("trainer.max_steps=-5", "max_steps"), ("data.batch_size=0", "batch_size")])
def test_instantiation_error_from_the_command_line_is_one_line(tmp_path, override, needle):
    code, err = _cli(["train.py", "logger=none", "model.first_stage=null", "model.scale_factor=1.0",
                      f"data.train_shards={_fake_shards(tmp_path)}", override], tmp_path)
    assert code == 2
    _assert_one_error_line(err, needle)
    assert [line for line in err.splitlines() if line.strip()] == [err.strip()], err  # nothing else on stderr


def test_unwritable_working_directory_moves_hydras_run_dir_or_says_permission_denied(tmp_path):
    prefix = _drop_override_rights()
    cwd, out = tmp_path / "readonly_cwd", tmp_path / "out"
    cwd.mkdir(mode=0o555)
    try:
        def run(*args):
            proc = subprocess.run([*prefix, sys.executable, str(ROOT / args[0]), *args[1:]], cwd=cwd,
                                  capture_output=True, text=True, timeout=120, env=ENV)
            return proc.returncode, proc.stderr

        # output_dir writable: Hydra's files go there, the run goes on (to the missing experts: exit 2)
        code, err = run("refine.py", f"inputs={tmp_path}", f"output_dir={out}", f"experts=[{tmp_path / 'no.ckpt'}]")
        assert code == 2 and "Traceback" not in err and "PermissionError" not in err, err[-2000:]
        assert "note: Hydra's run dir" in err and f"output_dir={out}" in err
        _assert_one_error_line(err, "no.ckpt")
        assert (out / ".hydra" / "config.yaml").is_file()
        # nothing writable (train's output folder is Hydra's run dir): one line, exit 2
        code, err = run("train.py", f"hydra.run.dir={cwd / 'run'}")
        assert code == 2
        _assert_one_error_line(err, f"permission denied: {cwd / 'run'}")
    finally:
        cwd.chmod(0o755)

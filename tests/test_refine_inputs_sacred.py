"""refine.py never writes onto an input, whatever ``overwrite`` says (issue 21 item 1): a property test over random
trees of inputs, symlinks (into and out of the output folders), hard links and files already in the output folder,
and the two reported cases (an input named grid.png in the output folder; ``output_dir/grids`` a link to the inputs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings as hyp_settings, strategies as st
from PIL import Image
from test_refine import _compose, _rgb, models  # noqa: F401 (models: the module fixture)

from refiner.apps.refine import settings
from refiner.data.images import encode_png
from refiner.errors import RefineError
from refiner.inference import refine_run
from refiner.inference.outputs import GRID_RECORD, png_text

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["a.png", "b.jpg", "grid.png", "summary.json", "config_resolved.yaml", "comparison_grid.png", "a.mask.png",
         "grid-2.png", "c.png"]
INPUT_FOLDERS = ["in", "in/sub", "out", "out/grids"]


@st.composite
def trees(draw) -> dict:
    return dict(
        inputs=draw(st.lists(st.tuples(st.sampled_from(INPUT_FOLDERS), st.sampled_from(NAMES)), min_size=1,
                             max_size=4, unique=True)),
        output_dir=draw(st.sampled_from(["out", "out", "in", "link_to_in"])),
        grids_link=draw(st.sampled_from([None, None, "in", "in/sub", "elsewhere"])),
        linked_inputs=draw(st.lists(st.sampled_from(NAMES), max_size=2, unique=True)),  # in/l_<n> -> elsewhere/<n>
        links_to_inputs=draw(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(["symlink", "hardlink"]),
                                                st.integers(0, 3)), max_size=2)),  # out/<n> -> an input
        existing=draw(st.lists(st.tuples(st.sampled_from(NAMES + ["grids/a.png"]),
                                         st.sampled_from(["foreign", "our_grid"])), max_size=2)),
        overwrite=draw(st.booleans()),
        grid=draw(st.sampled_from(["combined", "per_image", "both", "none"])),
    )


def _image_bytes(name: str, seed: int) -> bytes:
    img = _rgb(8, 8, seed)
    if name.endswith(".jpg"):
        path = Path(tempfile.mkdtemp()) / "x.jpg"
        Image.fromarray(img).save(path)
        return path.read_bytes()
    return encode_png(img)  # a PNG also under .json/.yaml names: any file PIL opens is an image input


def _build(root: Path, tree: dict) -> tuple[list[Path], Path]:
    for folder in ("in/sub", "elsewhere"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    if tree["output_dir"] == "link_to_in":
        (root / "out").symlink_to(root / "in")
    else:
        (root / "out").mkdir(exist_ok=True)
    if tree["grids_link"] and not (root / "out/grids").exists():
        (root / "out/grids").symlink_to(root / tree["grids_link"])
    inputs: list[Path] = []
    for k, (folder, name) in enumerate(tree["inputs"]):
        path = root / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_bytes(_image_bytes(name, k))
            inputs.append(path)
    for k, name in enumerate(tree["linked_inputs"]):
        target = root / "elsewhere" / name
        target.write_bytes(_image_bytes(name, 10 + k))
        (root / "in" / f"l_{name}").symlink_to(target)
        inputs.append(root / "in" / f"l_{name}")
    for k, (name, kind) in enumerate(tree["existing"]):
        path = root / "out" / name
        if not path.exists() and path.parent.is_dir():
            path.write_bytes(encode_png(_rgb(8, 8, 20 + k), png_text(GRID_RECORD)) if kind == "our_grid"
                             else b"someone else's file")
    for name, kind, which in tree["links_to_inputs"]:
        path, source = root / "out" / f"link_{name}", inputs[which % len(inputs)]
        if not (path.exists() or path.is_symlink()):
            path.symlink_to(source) if kind == "symlink" else os.link(source, path)
    return inputs, root / ("in" if tree["output_dir"] == "in" else "out")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


GRID_PNG_IN_OUTPUT = dict(inputs=[("out", "grid.png"), ("out", "b.jpg")], output_dir="out", grids_link=None,
                          linked_inputs=[], links_to_inputs=[], existing=[], overwrite=True, grid="combined")
GRIDS_LINK_TO_INPUTS = dict(inputs=[("in", "a.png"), ("in", "c.png")], output_dir="out", grids_link="in",
                            linked_inputs=[], links_to_inputs=[], existing=[], overwrite=True, grid="per_image")


@pytest.fixture(scope="module")
def base_settings(models, tmp_path_factory):  # noqa: F811
    """The run's settings; every example refines with the same models, so their pipeline is built once."""
    built: dict = {}
    real = refine_run.build_pipeline
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(refine_run, "build_pipeline", lambda s, device, starts: built.get(starts) or built.setdefault(
            starts, real(s, device, starts)))
        yield settings(_compose(models, "x.png", tmp_path_factory.mktemp("unused"), "steps=2"))


@hyp_settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees())
@example(tree=GRID_PNG_IN_OUTPUT)
@example(tree=GRIDS_LINK_TO_INPUTS)
def test_no_run_changes_an_input(base_settings, tree):
    with tempfile.TemporaryDirectory() as tmp:
        inputs, output_dir = _build(Path(tmp), tree)
        before = {p: _sha(p) for p in inputs}
        s = dataclasses.replace(base_settings, inputs=[str(p) for p in inputs], output_dir=str(output_dir),
                                overwrite=tree["overwrite"], grid=tree["grid"])
        try:
            refine_run.run(s)
        except RefineError:  # refusing (exit 2) is allowed; changing an input is not
            pass
        assert {p: _sha(p) for p in inputs} == before


@pytest.mark.parametrize("tree", [GRID_PNG_IN_OUTPUT, GRIDS_LINK_TO_INPUTS], ids=["grid.png", "grids-link"])
def test_a_write_onto_an_input_is_refused_before_anything_is_written(base_settings, tmp_path, tree):
    inputs, output_dir = _build(tmp_path, tree)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    s = dataclasses.replace(base_settings, inputs=[str(p) for p in inputs], output_dir=str(output_dir),
                            overwrite=True, grid=tree["grid"])
    with pytest.raises(RefineError, match=r"which is the input image .*(grid\.png|in/a\.png); inputs are never "
                                          r"replaced, not even with overwrite=true"):
        refine_run.run(s)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before

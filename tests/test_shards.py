import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from refiner.data.images import load_image, to_tensor
from refiner.data.latents import SkipCounter, check_enough_shards, expand_shards, latent_dataset, read_all_samples
from refiner.data.shards import build_shards, load_manifest
from refiner.models.vq import VQModel, tiny_ddconfig


@pytest.fixture(scope="module")
def vqs():
    torch.manual_seed(0)
    f4 = VQModel(tiny_ddconfig(4, resolution=32), n_embed=64, embed_dim=3).eval()
    f8 = VQModel(tiny_ddconfig(8, resolution=32), n_embed=64, embed_dim=4).eval()
    return f4, f8


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / f"img.{i}.png")
    Image.fromarray(rng.integers(0, 256, (22, 29, 3), dtype=np.uint8)).save(d / "odd.png")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (d / "img.0.txt").write_text("a red square\n")
    return d


def _snapshot(d: Path):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_build_shards_contents_manifest_and_report(tmp_path, image_dir, vqs):
    f4, f8 = vqs
    before = _snapshot(image_dir)
    out = tmp_path / "shards"
    report = build_shards(image_dir, out, f4, f8, maxcount_per_shard=2, batch_size=3, progress=False)
    assert _snapshot(image_dir) == before  # sources untouched
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar", "shard-000001.tar",
                                                     "shard-000002.tar"]
    assert load_manifest(out) == json.loads(json.dumps(report))
    assert report["num_samples"] == 5 and report["num_shards"] == 3
    assert [Path(s["file"]).name for s in report["skipped"]] == ["corrupt.jpg"]
    assert "corrupt.jpg" in report["skipped"][0]["reason"]
    assert report["cropped"] == 1 and report["padded"] == 0 and report["captions"] == 1
    assert report["latent_channels"] == 3 and report["first_stage_factors"] == {"f4": 4, "f8": 8}
    assert report["image_shapes"] == {"16x16": 4, "16x24": 1}  # 22x29 centre-cropped to 16x24
    assert report["latent_shapes"] == {"3x4x4": 4, "3x4x6": 1}

    samples = read_all_samples(expand_shards(out), images=True)
    keys = [s["__key__"] for s in samples]
    assert keys == ["000001_img_0", "000002_img_1", "000003_img_2", "000004_img_3", "000005_odd"]  # sorted, no dots
    assert samples[0]["txt"] == "a red square" and "txt" not in samples[1]
    odd = samples[-1]
    assert odd["meta"]["original_size"] == [22, 29] and odd["meta"]["cropped"] and odd["meta"]["size"] == [16, 24]
    src = load_image(image_dir / "odd.png")
    assert torch.equal(odd["clean"], to_tensor(np.ascontiguousarray(src[3:19, 2:26])))

    # independent recomputation: degraded = f8 round trip, latents = f4.encode of clean / uint8 degraded
    with torch.no_grad():
        for s in samples:
            clean = s["clean"][None]
            assert torch.allclose(s["z_clean"], f4.encode(clean)[0], atol=1e-5)
            ref_degraded = f8.round_trip(clean).clamp(-1, 1)[0]
            assert (s["degraded"] - ref_degraded).abs().max() <= 1 / 127.5 + 1e-6  # uint8 rounding
            assert torch.allclose(s["z_degraded"], f4.encode(s["degraded"][None])[0], atol=1e-5)
            assert s["z_clean"].dtype == torch.float32 and not torch.equal(s["z_clean"], s["z_degraded"])


def test_build_shards_pad_size_and_refusals(tmp_path, image_dir, vqs):
    f4, f8 = vqs
    out = tmp_path / "shards"
    rep = build_shards(image_dir, out, f4, f8, fit="pad", progress=False)
    assert rep["padded"] == 1 and rep["cropped"] == 0 and rep["image_shapes"] == {"16x16": 4, "24x32": 1}
    with pytest.raises(FileExistsError, match="overwrite"):
        build_shards(image_dir, out, f4, f8, progress=False)
    rep = build_shards(image_dir, out, f4, f8, size=8, overwrite=True, maxcount_per_shard=1, progress=False)
    assert rep["num_shards"] == 5 and rep["image_shapes"] == {"8x8": 5} and rep["resized"] == 5
    assert rep["cropped"] == 1  # only the non-square image needed a centre crop after resizing
    assert len(list(out.glob("shard-*.tar"))) == 5 and not list(out.glob(".build-*"))
    with pytest.raises(ValueError, match="multiple of 8"):
        build_shards(image_dir, tmp_path / "x", f4, f8, size=20)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files"):
        build_shards(empty, tmp_path / "y", f4, f8)
    with pytest.raises(FileNotFoundError, match="missing"):
        build_shards(tmp_path / "missing", tmp_path / "y", f4, f8)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no readable images.*empty file"):
        build_shards(bad, tmp_path / "z", f4, f8, progress=False)
    assert not (tmp_path / "z").exists() or not list((tmp_path / "z").glob("shard-*"))


# ---------------------------------------------------------------------------------------------- reading


def _tensor_bytes(t):
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def write_latent_shards(root: Path, n_shards: int, per_shard: int, corrupt_key: str | None = None) -> list[str]:
    """Synthetic shards: sample i has z_clean filled with i, z_degraded with -i."""
    root.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(root / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as w:
        for i in range(n_shards * per_shard):
            key = f"{i:06d}"
            z = _tensor_bytes(torch.full((3, 2, 2), float(i)))
            w.write({"__key__": key, "z_clean.pth": b"garbage" if key == corrupt_key else z,
                     "z_degraded.pth": _tensor_bytes(torch.full((3, 2, 2), -float(i)))})
    return expand_shards(root)


def test_latent_dataset_skips_and_counts_corrupt_samples(tmp_path, caplog):
    urls = write_latent_shards(tmp_path, n_shards=2, per_shard=3, corrupt_key="000004")
    counter = SkipCounter()
    ds = latent_dataset(urls, shuffle_buffer=0, counter=counter)
    got = [int(s["z_clean"][0, 0, 0]) for s in ds]
    assert got == [0, 1, 2, 3, 5]
    assert counter.skipped == 1 and "000004" in counter.reasons[0] and "z_clean" in counter.reasons[0]
    assert "skipping unreadable shard sample" in caplog.text

    # a truncated shard: its readable prefix is used, the rest counted, nothing raised
    data = Path(urls[1]).read_bytes()
    Path(urls[1]).write_bytes(data[:1700])
    counter = SkipCounter()
    samples = read_all_samples(urls, counter=counter)
    assert [s["__key__"] for s in samples][:3] == ["000000", "000001", "000002"]
    assert counter.skipped >= 1


def test_read_all_samples_max_and_missing_entries(tmp_path):
    urls = write_latent_shards(tmp_path, n_shards=1, per_shard=4)
    assert len(read_all_samples(urls, max_samples=2)) == 2
    counter = SkipCounter()
    assert read_all_samples(urls, images=True, counter=counter) == []  # no png entries in these shards
    assert counter.skipped == 4 and "clean.png" in counter.reasons[0]


def test_stream_split_by_rank_is_disjoint_and_complete(tmp_path, monkeypatch):
    urls = write_latent_shards(tmp_path, n_shards=4, per_shard=2)
    seen = []
    for rank in range(2):
        ds = latent_dataset(urls, shuffle_buffer=4, rank=rank, world_size=2)
        seen.append({int(s["z_clean"][0, 0, 0]) for s in ds})
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(8)) and len(seen[0]) == 4

    # default node splitter (wds.split_by_node) reads RANK / WORLD_SIZE
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert {int(s["z_clean"][0, 0, 0]) for s in latent_dataset(urls, shuffle_buffer=0)} == seen[1]

    # resampled + with_epoch: a fixed number of samples, drawn with replacement
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert len(list(latent_dataset(urls, resampled=True, epoch_length=11, shuffle_buffer=2))) == 11


def test_check_enough_shards_and_expand(tmp_path):
    check_enough_shards(4, world_size=2, num_workers=2)
    check_enough_shards(2, world_size=2, num_workers=0)
    with pytest.raises(ValueError, match=r"3 shard\(s\) for 2 rank\(s\) x 2 dataloader worker\(s\).*fewer workers"):
        check_enough_shards(3, world_size=2, num_workers=2)

    urls = write_latent_shards(tmp_path / "s", n_shards=3, per_shard=1)
    assert expand_shards(tmp_path / "s") == urls
    assert expand_shards(str(tmp_path / "s" / "shard-{000000..000002}.tar")) == urls
    with pytest.raises(FileNotFoundError, match="000003.*build the shards"):
        expand_shards(str(tmp_path / "s" / "shard-{000000..000003}.tar"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        expand_shards(tmp_path / "nowhere")
    (tmp_path / "e").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        expand_shards(tmp_path / "e")

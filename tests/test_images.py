import numpy as np
import pytest
import torch
from PIL import Image

from refiner.data.images import (
    ImageError,
    PaddedImages,
    crop_to,
    list_images,
    load_image,
    pad_to_multiple,
    save_png_atomic,
    to_tensor,
    to_uint8,
)


def test_rgba_is_composited_over_white(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (200, 100, 0, 255)  # opaque: unchanged
    rgba[0, 1] = (200, 100, 0, 0)  # transparent: white
    rgba[1, 0] = (0, 0, 0, 128)  # half black over white: ~127
    rgba[1, 1] = (255, 0, 0, 64)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png").astype(int)
    a = rgba[..., 3:].astype(float) / 255
    expected = rgba[..., :3] * a + 255 * (1 - a)
    assert out.shape == (2, 2, 3)
    assert np.abs(out - expected).max() <= 1
    assert tuple(out[0, 1]) == (255, 255, 255)


def test_gray_modes(tmp_path):
    gray = np.array([[0, 10], [128, 255]], np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "l.png")
    out = load_image(tmp_path / "l.png")
    assert (out == gray[..., None]).all()

    Image.fromarray(np.stack([gray, gray * 0 + 255], -1), "LA").save(tmp_path / "la.png")
    assert (load_image(tmp_path / "la.png") == gray[..., None]).all()  # fully opaque

    g16 = np.array([[0, 257 * 10], [257 * 128, 65535]], np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    assert (load_image(tmp_path / "g16.png") == gray[..., None]).all()

    Image.fromarray(g16.astype(np.int32)).save(tmp_path / "g32.tif")
    assert Image.open(tmp_path / "g32.tif").mode == "I"
    assert (load_image(tmp_path / "g32.tif") == gray[..., None]).all()

    Image.fromarray(gray.astype(np.float32) / 255).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    assert (load_image(tmp_path / "f.tif") == gray[..., None]).all()


def test_palette_with_transparency(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png")
    assert tuple(load_image(tmp_path / "p.png")[0, 1]) == (200, 100, 50)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pt.png", transparency=0)
    out = load_image(tmp_path / "pt.png")
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (200, 100, 50)


def test_cmyk(tmp_path):
    cmyk = np.array([[[100, 0, 50, 20]]], np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    # naive (profile-free) conversion, as Pillow does it: channel = (255 - ink) * (255 - K) / 255
    c, m, y, k = cmyk[0, 0].astype(float)
    expected = [(255 - ink) * (255 - k) / 255 for ink in (c, m, y)]  # 142.8, 235, 188.9
    assert np.abs(load_image(tmp_path / "c.tif")[0, 0].astype(float) - expected).max() <= 0.6


def test_exif_orientation_applied(tmp_path):
    stored = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(stored).save(tmp_path / "r.png", exif=exif)
    out = load_image(tmp_path / "r.png")
    assert out.shape == (3, 2, 3)
    assert (out[:, -1] == stored[0]).all()  # the stored top row becomes the right column
    assert (out == np.rot90(stored, k=-1)).all()


def test_bad_files_raise_image_error_naming_file(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    for name in ("trunc.png", "empty.png", "junk.jpg", "missing.png"):
        with pytest.raises(ImageError, match=name):
            load_image(tmp_path / name)
    with pytest.raises(ImageError, match="empty file"):
        load_image(tmp_path / "empty.png")
    assert issubclass(ImageError, ValueError)


def test_list_images(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.PNG", "a.jpg", "c.txt", "sub/d.webp"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG"]
    assert [p.name for p in list_images(str(tmp_path / "**" / "*.webp"))] == ["d.webp"]
    both = list_images([tmp_path / "a.jpg", tmp_path / "sub", str(tmp_path / "*.jpg")])
    assert [p.name for p in both] == ["a.jpg", "d.webp"]
    with pytest.raises(FileNotFoundError, match="nope"):
        list_images(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"\*\.gif"):
        list_images(str(tmp_path / "*.gif"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        list_images(tmp_path / "empty")


def test_tensor_round_trip_and_range():
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    t = to_tensor(img)
    assert t.shape == (3, 5, 7) and t.dtype == torch.float32
    assert float(to_tensor(np.full((1, 1, 3), 255, np.uint8)).max()) == 1.0
    assert float(to_tensor(np.zeros((1, 1, 3), np.uint8)).min()) == -1.0
    assert (to_uint8(t) == img).all()
    assert (to_uint8(torch.full((3, 1, 1), 5.0)) == 255).all()  # clamped
    assert (to_uint8(torch.full((3, 1, 1), -5.0)) == 0).all()


def test_pad_crop_round_trip():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6)
    padded, size = pad_to_multiple(x, 8)
    assert padded.shape == (2, 3, 8, 8) and size == (5, 6)
    assert torch.equal(crop_to(padded, size), x)
    # reflect: row 5 mirrors row 3 (edge row 4 not repeated)
    assert torch.equal(padded[..., 5, :6], x[..., 3, :])
    assert torch.equal(padded[..., :5, 6], x[..., :, 4])
    # too small to reflect by 7 -> replicate the edge
    tiny = torch.arange(3.0).reshape(1, 1, 3)
    p, s = pad_to_multiple(tiny, 8)
    assert p.shape == (1, 8, 8) and torch.equal(p[0, 0], torch.tensor([0, 1, 2, 2, 2, 2, 2, 2.0]))
    assert torch.equal(crop_to(p, s), tiny)
    same, s2 = pad_to_multiple(torch.zeros(3, 8, 16), 8)
    assert same.shape == (3, 8, 16) and s2 == (8, 16)
    with pytest.raises(ValueError):
        crop_to(torch.zeros(3, 4, 4), (5, 4))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "constant"])
def test_padded_images_crops_equal_the_padded_float_batch(mode):
    """PaddedImages keeps uint8 and converts per crop; every crop, inside the image or reaching into the padding,
    equals the same crop of pad_to_multiple(stack(to_tensor)) bit for bit. Hand value: constant padding is 0.0
    in [-1, 1] (no uint8 value), and an image already on the multiple is not copied."""
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (13, 10, 3), dtype=np.uint8) for _ in range(2)]
    reference = pad_to_multiple(torch.stack([to_tensor(img) for img in images]), 8, mode=mode)[0]
    padded = PaddedImages(images, 8, mode)
    assert padded.shape == reference.shape == (2, 3, 16, 16) and padded.size == (13, 10)
    assert padded.pixels.dtype == torch.uint8
    assert torch.equal(padded.full(), reference)
    for rows, cols in ((slice(0, 8), slice(0, 8)), (slice(5, 16), slice(3, 11)), (slice(12, 16), slice(9, 16)),
                       (slice(14, 16), slice(12, 16))):
        crop = padded.crop(rows, cols)
        assert crop.is_contiguous() and torch.equal(crop, reference[..., rows, cols]), (rows, cols)
    if mode == "constant":
        assert (padded.full()[..., 13:, :] == 0).all() and (padded.full()[..., 10:] == 0).all()
    one = np.ascontiguousarray(images[0][:8, :8])
    assert PaddedImages([one], 8, mode).pixels.data_ptr() == torch.from_numpy(one).data_ptr()  # a view, no copy
    read_only = images[0].copy()
    read_only.flags.writeable = False
    assert torch.equal(PaddedImages([read_only], 8, mode).full(), reference[:1])
    with pytest.raises(ValueError, match="share one size"):
        PaddedImages([images[0], images[0][:12]], 8)
    with pytest.raises(ValueError, match="uint8"):
        PaddedImages([images[0].astype(np.float32)], 8)


def test_save_png_atomic_protects_inputs(tmp_path):
    img = np.random.default_rng(1).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    out = save_png_atomic(tmp_path / "o" / "x.png", img)
    assert (load_image(out) == img).all()
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["x.png"]  # no temp files left
    with pytest.raises(ValueError, match="refusing to overwrite"):
        save_png_atomic(tmp_path / "o" / "x.png", img, protect={str(tmp_path / "o" / ".." / "o" / "x.png")})


# ---------------------------------------------------------------------------------------------- demo data


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_demo_build_is_deterministic_and_well_formed(tmp_path):
    from refiner.data.demo import build_demo_images, demo_photos

    kw = dict(crop_size=32, crops_per_photo=3, photos=["astronaut", "chelsea", "flower"], progress=False)
    counts = build_demo_images(tmp_path / "a", seed=0, **kw)
    assert counts == {"train": 6, "val": 2}  # astronaut: 3 crops + 3 flips; chelsea, flower held out
    a = _tree(tmp_path / "a")
    assert sorted(a) == sorted(
        [f"train/astronaut_{i:03d}{s}.png" for i in range(3) for s in ("", "_flip")] + ["val/chelsea.png", "val/flower.png"]
    )
    build_demo_images(tmp_path / "b", seed=0, **kw)
    assert _tree(tmp_path / "b") == a
    build_demo_images(tmp_path / "c", seed=1, **kw)
    assert _tree(tmp_path / "c")["train/astronaut_000.png"] != a["train/astronaut_000.png"]

    crop = load_image(tmp_path / "a/train/astronaut_001.png")
    assert crop.shape == (32, 32, 3)
    assert (load_image(tmp_path / "a/train/astronaut_001_flip.png") == crop[:, ::-1]).all()
    for name, photo in demo_photos(["chelsea", "flower"]).items():
        val = load_image(tmp_path / f"a/val/{name}.png")
        assert val.shape[0] == 64 and val.shape[1] % 8 == 0  # short side 2*crop_size, multiple of 8
        h, w = photo.shape[:2]
        assert abs(val.shape[1] - round(w * 64 / h)) < 8  # aspect kept up to the centre crop

    with pytest.raises(FileExistsError):
        build_demo_images(tmp_path / "a", seed=0, **kw)
    build_demo_images(tmp_path / "a", seed=0, overwrite=True, **kw)
    assert _tree(tmp_path / "a") == a


def test_demo_validation_crops_come_only_from_held_out_photos(tmp_path):
    from refiner.data.demo import build_demo_images

    counts = build_demo_images(tmp_path, crop_size=32, crops_per_photo=2, photos=["astronaut", "chelsea"],
                               val_photos=("chelsea",), val_crops=3, progress=False)
    assert counts == {"train": 4, "val": 3}
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == [f"chelsea_{i:03d}.png" for i in range(3)]
    assert all(load_image(p).shape == (32, 32, 3) for p in (tmp_path / "val").iterdir())
    assert not list((tmp_path / "train").glob("chelsea*"))


def test_demo_full_scale_crop_matches_pil_resize(tmp_path):
    from refiner.data.demo import build_demo_images, demo_photos

    build_demo_images(tmp_path, crop_size=32, crops_per_photo=1, photos=["astronaut"], scales=(1.0,), progress=False)
    photo = demo_photos(["astronaut"])["astronaut"]  # square, so the scale-1 crop is the whole photo
    expected = np.asarray(Image.fromarray(photo).resize((32, 32), Image.Resampling.LANCZOS))
    assert (load_image(tmp_path / "train/astronaut_000.png") == expected).all()


def test_demo_cli(tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "refiner.data.demo", str(tmp_path), "--crop-size", "16", "--crops-per-photo", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "wrote 14 training and 16 validation images" in r.stdout  # 8 crops of each held-out photo
    assert len(list((tmp_path / "train").glob("*.png"))) == 14

"""A tiny end-to-end world built through the real entry points (demo images -> VQ-f4/f8 -> shards).

Used by the training tests; everything is 32 px and a handful of steps, so it builds in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from conftest import TINY_TRAINER, compose_config

CROP = 32
# tiny windows denoiser for 32 px crops -> 8x8 f4 latents
TINY_UNET = [
    "model.unet.image_size=8",
    "model.unet.model_channels=32",
    "model.unet.channel_mult=[1,2]",
    "model.unet.attention_resolutions=[2]",
    "model.unet.num_head_channels=16",
    "model.grid_steps=2",
    "model.grid_samples=2",
    "data.batch_size=4",
]


@dataclass
class World:
    root: Path
    demo_dir: Path
    shards_dir: Path
    f4_ckpt: Path
    f8_ckpt: Path

    def paths(self) -> list[str]:
        return [
            "paths.demo=demo",
            f"paths.demo_dir={self.demo_dir}",
            f"paths.shards_dir={self.shards_dir}",
            f"first_stage.f4.ckpt_path={self.f4_ckpt}",
            f"first_stage.f8.ckpt_path={self.f8_ckpt}",
            f"first_stage.f4.params.ddconfig.resolution={CROP}",
            f"first_stage.f8.params.ddconfig.resolution={CROP}",
        ]

    def refiner_overrides(self, experiment: str, *extra: str) -> list[str]:
        return [f"experiment={experiment}", *TINY_TRAINER, *self.paths(), *TINY_UNET, *extra]

    def train_refiner(self, experiment: str, out: Path, *extra: str) -> dict:
        from refiner.apps.train import run

        return run(compose_config("train", self.refiner_overrides(experiment, *extra), out))


def build_world(root: Path) -> World:
    from refiner.apps.build_shards import run as prepare
    from refiner.apps.train import run as train
    from refiner.data.demo import build_demo_images

    demo = root / "demo"
    build_demo_images(demo, crop_size=CROP, crops_per_photo=3, photos=["astronaut", "coffee", "rocket", "chelsea"],
                      val_photos=("chelsea",), progress=False)
    ckpts = {}
    for name in ("f4", "f8"):
        out = root / f"vq_{name}"
        cfg = compose_config("train", [
            f"experiment=demo_vq_{name}", *TINY_TRAINER, f"paths.demo_dir={demo}", f"data.crop_size={CROP}",
            f"first_stage.{name}.params.ddconfig.resolution={CROP}", "data.batch_size=4",
        ], out)
        ckpts[name] = Path(train(cfg)["last_ckpt"])
    world = World(root, demo, root / "shards", ckpts["f4"], ckpts["f8"])
    prepare(compose_config("build_shards", [*world.paths(), "splits.train.out=" + str(world.shards_dir / "demo/train"),
                                            "splits.val.out=" + str(world.shards_dir / "demo/val"),
                                            "maxcount_per_shard=8"], root / "prep"))
    return world

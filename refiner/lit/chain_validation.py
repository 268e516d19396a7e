"""Whole-chain validation: at every validation, run the chain users deploy, not just the window being trained.

With ``val.chain=[earlier window checkpoints]`` (conf/train.yaml), :class:`ChainValidation` builds the chain of
those windows (``Chain.from_paths``) plus the window being trained (``Chain.from_module``: its live UNet, which
holds the EMA weights during validation because the EMA callback swaps them in for the whole validation epoch).
For the first ``val.samples`` validation samples (rank 0) it refines the validation latents exactly as deployment
does, through :meth:`refiner.inference.chain.Chain.refine`: the degraded latent (``val.input=degraded``; ``clean``
to refine clean latents) scaled, noised to ``val.t_start`` (default: the top of the chain's highest window) and
denoised over the benchmark's grid (``val.steps``, default :func:`refiner.sampling.steps_for` with 20
timesteps per step), then decodes it with the f4 the module loads for its grids. It logs to the Lightning
loggers (wandb, csv):

* ``val_chain/swd_x1e3``: SWD (:func:`refiner.metrics.swd`, Laplacian-pyramid patches, x1e3) of the chain's
  outputs to the clean validation images, and ``val_chain/input_swd_x1e3`` for the chain's inputs;
* with ``val.checker=true`` (the data are the procedural heads): ``val_chain/artifact_rate`` and
  ``val_chain/input_artifact_rate``, the composition checker's fraction of failing images
  (:func:`refiner.data.checker.artifact_rate`), the benchmark's headline number;

and writes ``val_grids/chain_step_<step>.png`` (input | chain output | clean) beside the window's own grids.
Noise is a pure function of (``val.seed``, batch index), so successive validations compare like for like.

**Under DDP** every rank validates on the same list (the latent DataModule's contract, with
``use_distributed_sampler: false`` as ``conf/trainer/ddp*.yaml`` set). Before, rank 0 refined all ``val.samples``
while the other ranks waited; had Lightning split the list (its default sampler), rank 0 would have scored only
its own share. Now the work is split and the score covers every rank: sample ``i`` (its position in the
validation list, ``i < val.samples``) is refined by rank ``i % world_size`` with the noise row it gets in a single
process (the batch's noise is drawn whole, then rows are taken), the outputs are gathered
(``trainer.strategy.all_gather``, padded to equal length), and rank 0 scores all of them in list order: the same
images, noise and metrics as one process (up to float rounding from other batch shapes). A checksum of the
clean images gathered from every rank refuses validation lists that differ between ranks (a split list would
make the score depend on the world size).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor

from refiner.data.checker import artifact_rate
from refiner.data.images import to_uint8
from refiner.errors import SettingError
from refiner.inference.chain import Chain
from refiner.lit.grids import log_grid
from refiner.lit.window_module import step_seed
from refiner.metrics import swd
from refiner.sampling import steps_for
from refiner.settings import require_choice, require_int

log = logging.getLogger(__name__)

INPUTS = ("degraded", "clean")


class ChainValidation(pl.Callback):
    """See the module docstring. ``chain``: earlier window checkpoints (not the one being trained)."""

    def __init__(self, chain: Sequence[str], t_start: int | None = None, steps: int | None = None, samples: int = 16,
                 input: str = "degraded", checker: bool = False, seed: int = 0, grid_samples: int = 8,
                 trust_checkpoint: bool = False, allow_first_stage_mismatch: bool = False):

        if isinstance(chain, str) or not chain:
            raise SettingError(f"val.chain must be a non-empty list of window checkpoints, got {chain!r}")
        self.paths = [str(p) for p in chain]
        self.t_start = None if t_start is None else require_int("val.t_start", t_start, minimum=0)
        self.steps = None if steps is None else require_int("val.steps", steps, minimum=1)
        self.samples = require_int("val.samples", samples, minimum=1)
        self.input = require_choice("val.input", input, INPUTS)
        self.checker, self.seed = bool(checker), int(seed)
        self.grid_samples = require_int("val.grid_samples", grid_samples, minimum=0)
        self.trust_checkpoint, self.allow_mismatch = trust_checkpoint, allow_first_stage_mismatch
        self._earlier = None
        self._decoder = None
        self._outputs: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []  # (list indices, inputs, refined, clean)
        self._seen, self._checksum = 0, 0.0  # samples of the validation list taken so far, and their checksum
        self.refined_indices: list[int] = []  # list positions this rank refined at the last validation

    # -- building the chain once, before any compute ----------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:

        if stage != "fit":
            return
        self._earlier = Chain.from_paths(self.paths, trust_checkpoint=self.trust_checkpoint, device=pl_module.device,
                                         allow_first_stage_mismatch=self.allow_mismatch)
        self._decoder = pl_module.load_decoder()
        if self._decoder is None:
            raise SettingError("val.chain needs model.first_stage.ckpt_path: the chain's outputs are decoded with it")
        chain = self._chain(pl_module)  # schedule, scale factor, f4 and window overlap: checked now
        if self.t_start is None:
            self.t_start = max(s.weights.window.t_max for s in chain.experts) - 1
        chain.plan(self.t_start, self._steps())  # every grid step in some window, t_start in the top one
        log.info("whole-chain validation: %s + this run, t_start %d, %d steps, %d samples", self.paths, self.t_start,
                 self._steps(), self.samples)

    def _chain(self, pl_module: pl.LightningModule):

        current = Chain.from_module(pl_module, source="the window being trained (EMA)")
        return Chain.from_experts([*self._earlier.experts, *current.experts],
                                 allow_first_stage_mismatch=self.allow_mismatch)

    def _steps(self) -> int:
        return self.steps or steps_for(self.t_start)

    # -- validation: refine the first samples, then score them -------------------------------------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._outputs, self._seen, self._checksum = [], 0, 0.0
        for expert in self._earlier.experts:  # setup ran before Lightning moved the module to its device
            expert.unet.to(pl_module.device)
        self._decoder.to(pl_module.device)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking or self._seen >= self.samples:
            return
        if "clean" not in batch:
            raise SettingError("whole-chain validation needs the clean validation images (a 'clean' key in the "
                               "validation batches)")
        first, n = self._seen, min(self.samples - self._seen, batch["clean"].shape[0])
        self._seen += n
        self._checksum += sum(float(batch["clean"][j].double().sum()) * (first + j + 1) for j in range(n))
        mine = [j for j in range(n) if (first + j) % trainer.world_size == trainer.global_rank]
        if not mine:
            return
        chain = self._chain(pl_module)
        z = batch[f"z_{self.input}"][:n].float().to(chain.device) * chain.scale_factor

        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(step_seed(self.seed, batch_idx)))
        rows = torch.tensor(mine)
        latent = chain.refine(z[rows], self.t_start, self._steps(), noise=noise[rows].to(z)).latent
        device = next(self._decoder.parameters()).device
        with torch.no_grad():
            images = self._decoder.decode((latent / chain.scale_factor).to(device)).clamp(-1, 1).float().cpu()
        self._outputs.append((rows + first, batch[self.input][rows].float().cpu(), images,
                              batch["clean"][rows].float().cpu()))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        outputs, self._outputs = self._outputs, []
        if trainer.sanity_checking or not self._seen:
            return
        indices, inputs, refined, clean = _gather(trainer, outputs, self._seen, self._checksum)
        self.refined_indices = [int(i) for i in torch.cat([o[0] for o in outputs])] if outputs else []
        if not trainer.is_global_zero:
            return
        metrics = chain_metrics(refined, clean, self.checker)
        metrics.update({f"input_{k}": v for k, v in chain_metrics(inputs, clean, self.checker).items()})
        for name, value in metrics.items():
            pl_module.log(f"val_chain/{name}", value, rank_zero_only=True, batch_size=len(refined))
        if self.grid_samples:

            k = self.grid_samples
            log_grid(pl_module, [inputs[:k], refined[:k], clean[:k]], name="val/chain_grid", stem="chain_step",
                     captions=[self.input, f"chain from t={self.t_start}, {self._steps()} steps", "clean"])


def _gather(trainer: pl.Trainer, outputs: list, seen: int, checksum: float) -> tuple[Tensor, ...]:
    """Every rank's ``(indices, inputs, refined, clean)``, concatenated in validation-list order (see the module
    docstring). All ranks must call it; under one process it only concatenates."""
    parts = [torch.cat(p) for p in zip(*outputs)]
    if trainer.world_size == 1:
        return tuple(parts)
    per_rank = -(-seen // trainer.world_size)  # rank r holds len(range(r, seen, W)) <= ceil(seen / W) samples
    checks = trainer.strategy.all_gather(torch.tensor([checksum], dtype=torch.float64)).reshape(-1)
    if not torch.all(checks == checks[0]):
        raise SettingError(f"val.chain under DDP: the ranks validate on different lists (checksums {checks.tolist()});"
                           " every rank must see the same validation list (trainer.use_distributed_sampler=false, "
                           "as conf/trainer/ddp*.yaml set)")
    # rank 0 always holds sample 0; a rank that refined nothing (fewer samples than ranks) pads from its shape
    shape = trainer.strategy.broadcast(tuple(parts[2].shape[1:]) if trainer.is_global_zero else None, src=0)
    if not parts:
        parts = [torch.zeros(0, dtype=torch.long), *(torch.zeros(0, *shape) for _ in range(3))]
    padded = [torch.cat([x, x.new_full((per_rank - len(x), *x.shape[1:]), -1)]) for x in parts]
    gathered = [trainer.strategy.all_gather(x).reshape(-1, *x.shape[1:]) for x in padded]
    order = gathered[0]
    keep = torch.nonzero(order >= 0).reshape(-1)
    keep = keep[torch.argsort(order[keep])]
    return tuple(g[keep] for g in gathered)


def chain_metrics(images: Tensor, clean: Tensor, checker: bool) -> dict[str, float]:
    """The benchmark's numbers for ``images`` (N, 3, H, W) in [-1, 1]: SWD x1e3 to ``clean`` and, with ``checker``,
    the composition checker's artifact rate."""

    values = {"swd_x1e3": swd((images.double() + 1) / 2, (clean.double() + 1) / 2)["mean"]}
    if checker:

        values["artifact_rate"] = artifact_rate([to_uint8(x) for x in images])
    return values

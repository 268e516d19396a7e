"""LightningModule that trains a small VQGAN first stage (the demo's own VQ-f4 and VQ-f8).

Loss: L1 reconstruction + codebook/commitment loss (VQ-VAE, van den Oord et al. 2017, eq. 3),
plus, after ``disc_start`` steps, taming's PatchGAN discriminator with the hinge loss
(taming's LPIPS term needs a weight download and is left out).

Codebook collapse is the usual failure of short VQ trainings, so the codebook is initialised from
encoder outputs of the first batch and codes unused for a while are restarted on random encoder
outputs (dead-code restart, as in Jukebox, Dhariwal et al. 2020, sec. 3.4). Written here because
taming's quantizer has neither; rank 0 draws the new codes and broadcasts them, so DDP ranks agree.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from refiner.lit.grids import log_grid
from refiner.models.vq import VQModel
from refiner.settings import to_plain

LR_SCHEDULES = ("constant", "cosine")


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor at optimizer step ``step``: ``(step + 1) / warmup`` during warmup, then
    ``(1 + cos(pi * p)) / 2`` with ``p`` the fraction of the remaining steps done (0 at ``total``)."""
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * p))


class FirstStageModule(pl.LightningModule):
    """Args:
    ddconfig, n_embed, embed_dim: ``VQModel`` params (CompVis first-stage ``params`` names).
    lr: Adam learning rate (taming uses 4.5e-6 per sample at scale; tiny demo models want ~2e-4).
    codebook_weight: weight of the codebook loss.
    disc_weight: weight of the generator's adversarial term; 0 disables the discriminator.
    disc_start: optimizer step at which the discriminator switches on.
    restart_every: steps between dead-code restarts (0 disables init and restarts).
    restart_until: no restarts from this optimizer step on (null: until the end). Every restart moves codes
        the decoder has learned to read, so a short training stops restarting early and lets the decoder settle.
    usage_decay: decay of the running code-usage counts; codes below ``dead_threshold`` restart.
    optimizer: partial optimizer (Hydra ``_partial_: true``); ``lr`` is set here.
    lr_schedule: ``constant``, or ``cosine``: linear warmup over ``warmup_steps``, then a cosine decay of
        the autoencoder's learning rate to 0 at ``max_steps`` (the trainer's; Loshchilov & Hutter 2017, eq. 5
        with one cycle and eta_min 0). The discriminator's rate stays constant.
    """

    def __init__(
        self,
        ddconfig: dict,
        n_embed: int,
        embed_dim: int,
        lr: float = 2e-4,
        codebook_weight: float = 1.0,
        disc_weight: float = 0.0,
        disc_start: int = 0,
        restart_every: int = 20,
        usage_decay: float = 0.9,
        dead_threshold: float = 0.03,
        optimizer: Optional[Callable] = None,
        restart_until: Optional[int] = None,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
    ):
        super().__init__()
        ddconfig = to_plain(ddconfig)
        self.save_hyperparameters(dict(ddconfig=ddconfig, n_embed=n_embed, embed_dim=embed_dim, lr=lr,
                                       codebook_weight=codebook_weight, disc_weight=disc_weight,
                                       disc_start=disc_start, restart_every=restart_every,
                                       usage_decay=usage_decay, dead_threshold=dead_threshold,
                                       restart_until=restart_until, lr_schedule=lr_schedule,
                                       warmup_steps=warmup_steps))
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
        vq = VQModel(ddconfig, n_embed=n_embed, embed_dim=embed_dim, legacy=False)
        self.register_buffer("code_usage", torch.zeros(n_embed), persistent=False)
        # Register VQModel's parts at top level and the discriminator under ``loss.``, so our
        # checkpoints have exactly the taming/CompVis first-stage key layout.
        object.__setattr__(self, "vq", vq)
        for name, child in vq.named_children():
            self.add_module(name, child)
        self.loss = torch.nn.Module()
        if disc_weight > 0:
            from taming.modules.discriminator.model import (
                NLayerDiscriminator,
                weights_init,
            )

            self.loss.discriminator = NLayerDiscriminator(input_nc=ddconfig["out_ch"], n_layers=2, ndf=32)
            self.loss.discriminator.apply(weights_init)
        self.optimizer_factory = optimizer or torch.optim.Adam
        self.automatic_optimization = False

    @property
    def discriminator(self):
        return getattr(self.loss, "discriminator", None)

    @property
    def params(self) -> dict:
        """What ``VQModel(**params)`` needs; stored in first-stage configs next to ``ckpt_path``."""
        h = self.hparams
        return dict(ddconfig=h.ddconfig, n_embed=h.n_embed, embed_dim=h.embed_dim)

    def reconstruction_losses(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_rec, codebook_loss = self.vq(x)
        return x_rec, (x_rec - x).abs().mean(), codebook_loss

    @torch.no_grad()
    def restart_dead_codes(self, x: torch.Tensor) -> int:
        """Init (first call) or restart rarely used codes on random encoder outputs; returns how many."""
        h = self.vq.encode(x)
        vectors = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        codebook = self.vq.quantize.embedding.weight
        nearest = self.vq.quantize(h)[2][2].flatten()  # taming's own nearest-code assignment
        counts = torch.bincount(nearest, minlength=codebook.shape[0]).float()
        first = self.code_usage.sum() == 0
        self.code_usage.mul_(self.hparams.usage_decay).add_(counts / counts.mean(), alpha=1 - self.hparams.usage_decay)
        dead = torch.ones_like(self.code_usage, dtype=torch.bool) if first else (
            self.code_usage < self.hparams.dead_threshold)
        g = torch.Generator().manual_seed(int(self.global_step))
        picks = torch.randint(0, vectors.shape[0], (codebook.shape[0],), generator=g).to(vectors.device)
        new = torch.where(dead[:, None], vectors[picks] + 1e-3 * vectors.std() * torch.randn(
            codebook.shape, generator=g).to(vectors), codebook)
        new = self.trainer.strategy.broadcast(new, src=0)
        codebook.copy_(new)
        self.code_usage[dead] = 1.0
        return int(dead.sum())

    def training_step(self, batch, batch_idx):
        x = batch["image"]
        every, until = self.hparams.restart_every, self.hparams.restart_until
        if every and self.global_step % every == 0 and (until is None or self.global_step < until):
            self.log("train/codes_restarted", float(self.restart_dead_codes(x)))
        opts = self.optimizers()
        opt_ae, opt_disc = (opts if isinstance(opts, list) else [opts, None])
        x_rec, l1, codebook = self.reconstruction_losses(x)
        loss = l1 + self.hparams.codebook_weight * codebook
        use_disc = self.discriminator is not None and self.global_step >= self.hparams.disc_start
        if use_disc:
            g_loss = -self.discriminator(x_rec).mean()  # hinge generator loss
            loss = loss + self.hparams.disc_weight * g_loss
        opt_ae.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(opt_ae, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
        opt_ae.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:  # manual optimization: Lightning does not step it
            scheduler.step()
        if use_disc:
            # hinge loss, Lim & Ye 2017: E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]
            d_loss = 0.5 * (F.relu(1 - self.discriminator(x)).mean()
                            + F.relu(1 + self.discriminator(x_rec.detach())).mean())
            opt_disc.zero_grad()
            self.manual_backward(d_loss)
            opt_disc.step()
            self.log("train/d_loss", d_loss)
        self.log_dict({"train/loss": loss, "train/l1": l1, "train/codebook": codebook}, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        x = batch["image"]
        x_rec, l1, codebook = self.reconstruction_losses(x)
        self.log("val/loss", l1 + self.hparams.codebook_weight * codebook, prog_bar=True, sync_dist=True,
                 batch_size=x.shape[0])
        self.log("val/l1", l1, sync_dist=True, batch_size=x.shape[0])
        if batch_idx == 0 and self.trainer.is_global_zero and not self.trainer.sanity_checking:

            n = min(4, x.shape[0])
            log_grid(self, [x[:n], x_rec[:n]], name="val/reconstruction", captions=["input", "reconstruction"])

    def configure_optimizers(self):
        opt_ae = self.optimizer_factory(self.vq.parameters(), lr=self.hparams.lr)
        optimizers = [opt_ae]
        if self.discriminator is not None:
            optimizers.append(self.optimizer_factory(self.discriminator.parameters(), lr=self.hparams.lr))
        if self.hparams.lr_schedule == "constant":
            return optimizers if len(optimizers) > 1 else opt_ae
        total = self.trainer.max_steps
        if total is None or total <= 0:
            raise ValueError("lr_schedule=cosine needs trainer.max_steps (the step the rate reaches 0)")
        warmup = int(self.hparams.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt_ae, lambda step: warmup_cosine(step, warmup, total))
        return optimizers, [{"scheduler": sched, "interval": "step"}]

"""LightningModule that trains one denoiser on a timestep window ``[t_min, t_max)``.

Thin on purpose: the noise process lives in ``refiner.diffusion``, sampling in ``refiner.sampling``.
EMA comes from Lightning's ``EMAWeightAveraging`` callback (``refiner.lit.ema.TrainableEMA``, configured in
``conf/callbacks``; under LoRA it averages only the adapters), so
``state_dict`` in a checkpoint holds EMA weights and ``current_model_state`` the raw ones.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from refiner.diffusion import (
    LOSS_WEIGHTINGS,
    ScheduleConfig,
    Window,
    loss_weight,
    q_sample,
    to_x0_eps,
    training_target,
)
from refiner.errors import SettingError
from refiner.formats.first_stage import first_stage_from_mapping
from refiner.formats.kinds import load_strict, mismatch_report
from refiner.formats.loading import load_base
from refiner.formats.lora import BASE_KEY, load_base_state
from refiner.formats.safe_load import CheckpointError
from refiner.inference.chain import Chain
from refiner.lit.grids import log_grid
from refiner.models.lora import (
    LoraSettings,
    adapter_state,
    inject_lora,
    is_adapter_key,
)
from refiner.models.unet import UNetModel
from refiner.settings import require_choice, require_int, require_number, to_plain

log = logging.getLogger(__name__)


def step_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of the integers given (seed, rank, step, micro-batch)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


class LossTerms(NamedTuple):
    """``loss``: the (weighted) training objective; ``t``: the timesteps drawn; ``mse``: the unweighted
    per-sample MSE on the network's target, one value per sample."""

    loss: torch.Tensor
    t: torch.Tensor
    mse: torch.Tensor


def t_buckets(window: Window, n: int) -> list[tuple[int, int]]:
    """``n`` contiguous half-open t ranges splitting the window as equally as integers allow (at most one
    per timestep); ``n=0`` gives none."""
    n = min(n, window.width)
    edges = [window.t_min + k * window.width // n for k in range(n + 1)] if n else []
    return list(zip(edges[:-1], edges[1:]))


class WindowRefiner(pl.LightningModule):
    """Denoiser trained only on ``t in [t_min, t_max)``.

    Args:
        unet: ``UNetModel`` params, CompVis ``unet_config.params`` names.
        window: ``{t_min, t_max, num_timesteps}`` plus optionally ``distribution`` (``uniform``,
            ``logit_normal`` with ``logit_mean``/``logit_std``, ``piecewise`` with ``piecewise``): t is drawn
            from it, nowhere else (:class:`refiner.diffusion.Window`).
        schedule: ``ScheduleConfig`` fields (CompVis ``linear``: 0.0015 -> 0.0195 for VQ-f4 LDMs).
        parameterization: what the network predicts: ``eps`` (CompVis), ``x0`` or ``v``.
        conditioning: ``None`` (refiner) or ``"concat"``: the degraded latent is concatenated on
            channels (LDM ``conditioning_key: concat``), the paired img2img baseline.
        scale_factor: latents are multiplied by this before diffusion (LDM ``scale_factor``; 1.0 for VQ).
        base_lr: learning rate per sample when ``scale_lr`` (LDM convention); otherwise the lr itself.
        scale_lr: lr = base_lr * world_size * batch_size * accumulate_grad_batches.
        warmup_steps: linear warmup of the lr over this many optimizer steps.
        optimizer: partial optimizer (Hydra ``_partial_: true``); ``lr`` is set here.
        seed: seeds t and noise as a pure function of (seed, rank, global step, micro-batch).
        grid_steps: DDIM steps for the validation image grid.
        first_stage: optional ``{ckpt_path, params}`` of the f4 autoencoder, to decode the grid.
        first_stage_fingerprint: :func:`refiner.formats.fingerprint.first_stage_fingerprint` of the f4 whose
            latents this window is trained on (train.py sets it); saved in the checkpoint so that sampling and
            finetuning can refuse another first stage. None when unknown.
        loss_weighting: ``none`` (plain MSE) or ``min_snr``: each sample's MSE is weighted by
            :func:`refiner.diffusion.loss_weight` (Min-SNR-gamma, Hang et al. 2023).
        min_snr_gamma: gamma of ``min_snr``.
        loss_buckets: the unweighted per-sample MSE is also logged per t bucket, ``{train,val}/loss_t{lo}_{hi}``,
            for this many equal buckets of the window (0: none).
        val_windows: ``[[t_min, t_max], ...]`` or None: validation also logs ``val/loss_in_{t_min}_{t_max}``, the
            plain eps-MSE with t uniform in that window, at fixed t and noise per batch (the generator of
            ``val/loss``), so models trained on different windows compare on the same in-window loss.
        lora: ``{rank, alpha, targets, dropout}`` (:class:`refiner.models.lora.LoraSettings`); rank > 0 wraps the
            target layers of the UNet in peft LoRA adapters and trains only those: the optimizer and the EMA see
            only adapters, and ``state_dict`` (so every checkpoint) holds only adapters.
        lora_base: where the frozen base weights come from (:func:`refiner.formats.lora.base_reference`: path,
            use_ema, fingerprint); train.py sets it from ``init_from``. Resuming (``ckpt_path``) reloads the base
            from the checkpoint's reference and refuses it if its weights changed.
    """

    def __init__(
        self,
        unet: dict,
        window: dict,
        schedule: dict,
        parameterization: str = "eps",
        conditioning: Optional[str] = None,
        scale_factor: float = 1.0,
        base_lr: float = 1e-4,
        scale_lr: bool = False,
        warmup_steps: int = 0,
        optimizer: Optional[Callable] = None,
        seed: int = 0,
        grid_steps: int = 10,
        grid_samples: int = 4,
        first_stage: Optional[dict] = None,
        batch_size: Optional[int] = None,
        first_stage_fingerprint: Optional[str] = None,
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
        loss_buckets: int = 4,
        val_windows: Optional[list] = None,
        lora: Optional[dict] = None,
        lora_base: Optional[dict] = None,
    ):
        super().__init__()
        unet, window, schedule, first_stage, val_windows, lora, lora_base = (
            to_plain(v) for v in (unet, window, schedule, first_stage, val_windows, lora, lora_base))
        self.lora = LoraSettings.from_config(lora)
        self.window = Window.from_config(window, int(schedule["num_timesteps"]))
        self.save_hyperparameters(  # the window as Window.to_dict(): a uniform one is stored as before
            dict(unet=unet, window=self.window.to_dict(), schedule=schedule, parameterization=parameterization,
                 conditioning=conditioning, scale_factor=float(scale_factor), base_lr=base_lr, scale_lr=scale_lr,
                 warmup_steps=warmup_steps, seed=seed, grid_steps=grid_steps, grid_samples=grid_samples,
                 first_stage=first_stage, batch_size=batch_size, first_stage_fingerprint=first_stage_fingerprint,
                 loss_weighting=loss_weighting, min_snr_gamma=min_snr_gamma, loss_buckets=loss_buckets,
                 val_windows=val_windows, lora=self.lora.to_dict() if self.lora else None,
                 lora_base=lora_base if self.lora else None)
        )
        require_choice("model.loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
        if not require_number("model.min_snr_gamma", min_snr_gamma) > 0:
            raise SettingError(f"model.min_snr_gamma must be > 0, got {min_snr_gamma!r}")
        if conditioning not in (None, "concat"):
            raise ValueError(f"conditioning must be null or 'concat', got {conditioning!r}")
        self.schedule = ScheduleConfig(**schedule)
        if self.window.num_timesteps != self.schedule.num_timesteps:
            raise ValueError(
                f"window.num_timesteps={self.window.num_timesteps} != schedule.num_timesteps="
                f"{self.schedule.num_timesteps}"
            )
        self.buckets = t_buckets(self.window, require_int("model.loss_buckets", loss_buckets, minimum=0))
        self.val_windows = [self._val_window(w) for w in (val_windows or [])]
        self.unet = UNetModel(**unet)
        if self.lora:
            inject_lora(self.unet, self.lora)
        self.register_buffer("alphas_cumprod", self.schedule.alphas_cumprod(), persistent=False)
        self.optimizer_factory = optimizer
        self._grid_batch: Optional[dict] = None
        self._decoder: list = []  # kept out of state_dict and EMA on purpose

    def on_fit_start(self) -> None:
        """Data-dependent statistics must agree on every rank (they are resolved before the fit)."""
        ours = torch.tensor(float(self.hparams.scale_factor))
        rank0 = self.trainer.strategy.broadcast(ours, src=0)
        if not torch.equal(ours, rank0):
            raise RuntimeError(f"scale_factor differs across ranks: rank {self.global_rank} has {ours.item()}, "
                               f"rank 0 has {rank0.item()}")

    # -- the window-restricted loss ---------------------------------------------------------
    def _generator(self, *parts: int) -> torch.Generator:
        return torch.Generator().manual_seed(step_seed(self.hparams.seed, *parts))

    def _val_window(self, bounds: Any) -> Window:
        if isinstance(bounds, (str, bytes)) or not hasattr(bounds, "__len__") or len(bounds) != 2:
            raise SettingError(f"model.val_windows entries are [t_min, t_max], got {bounds!r}")
        try:
            return Window(bounds[0], bounds[1], self.schedule.num_timesteps)
        except (TypeError, ValueError) as err:
            raise SettingError(f"model.val_windows entry {list(bounds)!r}: {err}") from err

    def _denoise(self, batch: dict, window: Window, generator: torch.Generator):
        """Noise the clean latents to t drawn from ``window`` (t first, then the noise, from ``generator``) and
        run the UNet: ``(output, z0, noise, x_t, t)``."""
        z0 = batch["z_clean"].float() * self.hparams.scale_factor
        t = window.sample(z0.shape[0], generator=generator).to(self.device)
        noise = torch.randn(z0.shape, generator=generator).to(self.device)
        x_t = q_sample(z0, t, self.alphas_cumprod, noise)
        concat = batch["z_degraded"].float() * self.hparams.scale_factor if self.hparams.conditioning else None
        return self.unet(x_t, t, concat=concat).float(), z0, noise, x_t, t

    def diffusion_loss(self, batch: dict, generator: torch.Generator) -> LossTerms:
        """MSE between the network output and its target at t drawn from the window, weighted per sample by
        ``loss_weighting`` (``none``: exactly ``F.mse_loss`` over the batch, as before weighting existed)."""
        out, z0, noise, _, t = self._denoise(batch, self.window, generator)
        target = training_target(self.hparams.parameterization, z0, noise, t, self.alphas_cumprod).float()
        if self.hparams.loss_weighting == "none":
            loss = F.mse_loss(out, target)
            return LossTerms(loss, t, (out.detach() - target).pow(2).flatten(1).mean(1))
        per_sample = (out - target).pow(2).flatten(1).mean(1)
        w = loss_weight(self.hparams.loss_weighting, t, self.alphas_cumprod, self.hparams.parameterization,
                        self.hparams.min_snr_gamma)
        return LossTerms((w.to(per_sample.dtype) * per_sample).mean(), t, per_sample.detach())

    def _log_buckets(self, stage: str, t: torch.Tensor, mse: torch.Tensor, every_bucket: bool, **kw) -> None:
        """Unweighted MSE per t bucket, weighted by how many samples fell in it. In validation every bucket is
        logged on every batch (an empty one with batch_size 0 adds nothing to the epoch mean), so that all
        ranks log the same keys for ``sync_dist``; a bucket no validation sample fell in all epoch logs nan."""
        for lo, hi in self.buckets:
            inside = (t >= lo) & (t < hi)
            count = int(inside.sum())
            if count or every_bucket:
                value = mse[inside].mean() if count else mse.new_zeros(())
                self.log(f"{stage}/loss_t{lo}_{hi}", value, batch_size=count, **kw)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        micro = batch_idx % max(1, self.trainer.accumulate_grad_batches)
        g = self._generator(self.global_rank, self.global_step, micro)
        loss, t, mse = self.diffusion_loss(batch, g)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({"train/t_min_drawn": t.min().float(), "train/t_max_drawn": t.max().float()})
        if self.hparams.loss_weighting != "none":
            self.log("train/loss_unweighted", mse.mean())
        self._log_buckets("train", t, mse, every_bucket=False)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        n = batch["z_clean"].shape[0]
        seed_parts = (2**32 - 1, batch_idx)  # fixed t and noise: val losses compare across evals
        loss, t, mse = self.diffusion_loss(batch, self._generator(*seed_parts))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=n)
        if self.hparams.loss_weighting != "none":
            self.log("val/loss_unweighted", mse.mean(), sync_dist=True, batch_size=n)
        self._log_buckets("val", t, mse, every_bucket=True, sync_dist=True)
        for window in self.val_windows:
            # plain eps-MSE, t uniform in the listed window, the same generator as val/loss: a model trained on
            # exactly this window with uniform t and no weighting logs the same number as its val/loss
            out, _, noise, x_t, t_in = self._denoise(batch, window, self._generator(*seed_parts))
            eps = to_x0_eps(out, x_t, t_in, self.alphas_cumprod, self.hparams.parameterization)[1]
            self.log(f"val/loss_in_{window.t_min}_{window.t_max}", F.mse_loss(eps, noise.float()), sync_dist=True,
                     batch_size=n)
        if batch_idx == 0:
            self._grid_batch = batch

    # -- validation image grid: degraded | refined within this window | clean ----------------
    def on_validation_epoch_end(self) -> None:
        batch, self._grid_batch = self._grid_batch, None
        if batch is None or not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        decoder = self.load_decoder()
        if decoder is None or "clean" not in batch:
            return

        n = self.hparams.grid_samples
        z_deg = batch["z_degraded"][:n].float()
        refined = Chain.from_module(self).preview(z_deg, steps=self.hparams.grid_steps)
        with torch.no_grad():
            images = decoder.decode(refined.to(next(decoder.parameters()).device)).clamp(-1, 1)
        rows = [batch["degraded"][:n].float(), images.to(batch["degraded"].device), batch["clean"][:n].float()]
        log_grid(self, rows, name="val/grid", captions=["degraded", f"refined {self.window}", "clean"])

    def load_decoder(self):
        """The f4 of ``first_stage`` (loaded once, kept out of state_dict and EMA), or None without a checkpoint."""
        if self._decoder:
            return self._decoder[0]
        cfg = self.hparams.first_stage
        if not cfg or not cfg.get("ckpt_path"):
            return None

        vq = first_stage_from_mapping(cfg, "f4", device=self.device)
        self._decoder.append(vq)
        return vq

    # -- LoRA: the frozen base and the adapter-only state ------------------------------------------------
    def load_base_weights(self, state: dict, source: str) -> None:
        """Plain-layout UNet weights (``init_from``) into the UNet: all of it, or the frozen base under LoRA."""

        if self.lora:
            load_base_state(self.unet, state, source)
        else:
            load_strict(self.unet, state, source)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:
        """Under LoRA only the adapters (the base is referenced by ``hparams.lora_base``, not copied)."""
        state = super().state_dict(*args, **kwargs)
        return adapter_state(state) if self.lora else state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Under LoRA the adapters only, strictly over them (the base was loaded by :meth:`on_load_checkpoint`)."""
        if not self.lora:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

        expected = {k: v.shape for k, v in adapter_state(super().state_dict()).items()}
        report = mismatch_report(expected, state_dict)
        if strict and report:
            raise CheckpointError(f"the checkpoint's LoRA adapters do not fit model.lora={self.lora.to_dict()}: "
                                  f"{report}")
        return super().load_state_dict({k: v for k, v in state_dict.items() if is_adapter_key(k)}, strict=False,
                                       assign=assign)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resume of a LoRA run: reload the frozen base the checkpoint refers to (checked by fingerprint)."""

        if not self.lora:
            return
        reference = (checkpoint.get("hyper_parameters") or {}).get(BASE_KEY)
        ours = self.hparams.get(BASE_KEY)
        if ours and reference and ours.get("fingerprint") != reference.get("fingerprint"):
            raise CheckpointError(f"the checkpoint's LoRA base ({reference.get('path')}) is not this run's "
                                  f"({ours.get('path')}): their weights differ")
        self.load_base_weights(load_base(reference, "the resumed checkpoint"), str((reference or {}).get("path")))
        self.hparams[BASE_KEY] = reference

    # -- optimizer --------------------------------------------------------------------------
    def effective_lr(self) -> float:
        if not self.hparams.scale_lr:
            return self.hparams.base_lr
        trainer = self.trainer
        batch = self.hparams.batch_size or getattr(trainer.datamodule, "batch_size", 1)
        return self.hparams.base_lr * trainer.world_size * batch * trainer.accumulate_grad_batches

    def configure_optimizers(self):
        lr = self.effective_lr()
        log.info("learning rate %.3g (base_lr %.3g, scale_lr=%s)", lr, self.hparams.base_lr, self.hparams.scale_lr)
        factory = self.optimizer_factory or torch.optim.AdamW
        opt = factory([p for p in self.unet.parameters() if p.requires_grad], lr=lr)  # adapters only under LoRA
        warmup = max(1, int(self.hparams.warmup_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

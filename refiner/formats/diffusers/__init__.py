"""refiner window experts <-> diffusers folders (``UNet2DModel``, ``VQModel``, ``DDIMScheduler``), one module per job:

* :mod:`.keymaps`: CompVis/taming state-dict names <-> diffusers names, and the tensor conversions (qkv split/join,
  1x1 convs <-> linears);
* :mod:`.config`: ``UNet2DModel`` / ``VQModel`` / ``DDIMScheduler`` configs <-> our UNet and VQ params and schedules,
  and the whole state-dict conversions built on them;
* :mod:`.folders`: reading diffusers folders (``init_from=<folder>``, ``first_stage.f4.ckpt_path=<folder>/vqvae``)
  and writing one model subfolder.

Window experts -> one diffusers folder is :func:`refiner.formats.exports.export_diffusers` (it needs the window and
first-stage loaders, which sit above this package).

Running an exported chain with diffusers components is inference, not a format:
:class:`refiner.inference.diffusers_pipeline.WindowChainPipeline`. Export needs no diffusers install; the pipeline
does.

Layouts were read from (facts only, the code is our own): diffusers v0.42.1
``scripts/convert_ldm_original_checkpoint_to_diffusers.py`` (CompVis UNet -> UNet2DModel names),
``models/unets/unet_2d.py`` and ``unet_2d_blocks.py`` (block order, ``attn_norm_num_groups``,
``Attention(heads=C // attention_head_dim)``), ``models/attention_processor.py`` (4D input ->
``(B, HW, C)``, linear q/k/v, ``to_out.0``), ``models/autoencoders/vq_model.py`` and ``vae.py`` (Encoder/
Decoder block order; the decoder's up blocks run lowest resolution first), ``schedulers/scheduling_ddim.py``
(``scaled_linear`` = linear in sqrt(beta), float32) and the LDMPipeline (divides latents by
``vqvae.config.scaling_factor`` before decoding).
"""

from refiner.formats.safe_load import CheckpointError

DIFFUSERS_VERSION = "0.42.1"  # the version these layouts were read from and tested against


class DiffusersFormatError(CheckpointError):
    """A model that has no diffusers equivalent, or a diffusers folder refiner cannot read."""

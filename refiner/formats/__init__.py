"""Formats of what enters and leaves refiner, one module per format:

* :mod:`.safe_load`: reading torch checkpoints safely (``weights_only``), ``CheckpointError``, safetensors sniffing;
* :mod:`.kinds`: what kind a checkpoint is, strict state-dict loading with readable mismatch reports;
* :mod:`.compvis`: CompVis latent-diffusion checkpoints and CompVis/taming VQ first stages;
* :mod:`.window_files`: our window experts (Lightning ``.ckpt``, ``.safetensors`` export);
* :mod:`.init_from`: finetuning's ``init_from`` dispatch over all of the above and diffusers folders;
* :mod:`.fingerprint`: the first-stage fingerprint; :mod:`.diffusers`: diffusers folders; :mod:`.model_card`.
"""

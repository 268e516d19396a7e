"""Formats of what enters and leaves refiner. Modules, lowest first (each imports only those above it in this list):

* :mod:`.safe_load`: reading torch checkpoints safely (``weights_only``), ``CheckpointError``, safetensors sniffing;
* :mod:`.fingerprint`: the first-stage fingerprint and architecture checks; :mod:`.model_card`: model cards;
* :mod:`.kinds`: what kind a checkpoint is, strict state-dict loading with readable mismatch reports;
* :mod:`.compvis`: CompVis latent-diffusion checkpoints and CompVis/taming first-stage checkpoint files;
* :mod:`.window_files`: our window experts as stored (Lightning ``.ckpt``, ``.safetensors`` export), read without
  following anything, and :func:`~.window_files.check_window_set` (what windows used together must share);
* :mod:`.lora`: LoRA adapters and their base reference, merged in memory;
* :mod:`.diffusers`: diffusers layouts (key maps, configs, reading folders, writing one model subfolder);
* :mod:`.first_stage`: any first stage (file or diffusers folder) -> ``VQModel``; ``FirstStageSpec``;
* :mod:`.loading`: window and ``init_from`` weights from any file, LoRA windows merged onto their base (the one place
  loading recurses);
* :mod:`.exports`: every export: one window -> ``.safetensors`` + card, a LoRA window -> a peft folder, a chain ->
  a diffusers folder.
"""

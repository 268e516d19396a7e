"""Find the artifacts, then fix only them: ASCED detection (paper and public-code variants, during generation or
in a probe pass over input images), trajectory-aware correction (TTC), per-pixel start times (Differential
Diffusion), a calibrated per-image start (``t_start=auto``), and two pixel-space steps after decoding: the paste-back
(``composite``) and the colour fix (``color_fix``). See ``dynamics``, ``detect``, ``correct``, ``probe``, ``composite``,
``color_fix``.
"""

"""Find the artifacts, then fix only them: ASCED detection (paper and public-code variants, during generation or
in a probe pass over input images), trajectory-aware correction (TTC), per-pixel start times (Differential
Diffusion) and a calibrated per-image start (``t_start=auto``). See ``dynamics``, ``detect``, ``correct``, ``probe``.
"""

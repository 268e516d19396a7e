"""refiner: train late-step (low-noise window) diffusion refiners and chain them at sampling time.

Timestep convention: ``t`` is the diffusion timestep, t=0 clean, t=T-1 pure noise.
Windows are half-open ``[t_min, t_max)``.
"""

__version__ = "0.1.0"

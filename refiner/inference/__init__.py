"""Inference on images of any size: tiled first stage, MultiDiffusion latent tiles, DemoFusion-style upscaling."""

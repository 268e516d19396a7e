"""Checkpoint formats from and for other ecosystems (diffusers folders, model cards)."""

"""Diffusion^2 pipeline."""

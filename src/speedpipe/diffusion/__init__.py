"""Diffusion processes (DiT/ADM conventions) and the timestep samplers / loss weightings of SpeeD and baselines."""
from .gaussian import GaussianDiffusion, SpacedDiffusion, create_diffusion

__all__ = ["GaussianDiffusion", "SpacedDiffusion", "create_diffusion"]

"""Diffusion processes, kept apart from the networks they drive."""
from models.diffusion.gaussian_diffusion import GaussianDiffusion, cosine_betas, linear_betas

__all__ = ["GaussianDiffusion", "linear_betas", "cosine_betas"]

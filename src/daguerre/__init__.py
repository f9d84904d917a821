"""daguerre: latent diffusion and Stable Diffusion, to read, train and run on an ordinary computer."""

__version__ = "0.1.0"

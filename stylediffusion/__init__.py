"""StyleDiffusion: prompt-embedding inversion and P2Plus editing of real images on current diffusers."""

__version__ = "0.1.0"

"""DDIM as short pure functions: the math of one step, visible, for any ``prediction_type``.

A step from noise level ``a_t`` (alphas_cumprod at t) to ``a_s`` is the same formula in both
directions: recover (x0, eps) from the model output, then re-noise x0 to level ``a_s``. Sampling
goes to a lower noise level, inversion to a higher one.
"""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler


def x0_and_eps(model_output: torch.Tensor, sample: torch.Tensor, a_t: torch.Tensor, prediction_type: str):
    """Predicted clean latent and noise from a UNet output at noise level ``a_t``."""
    sqrt_a, sqrt_1ma = a_t.sqrt(), (1 - a_t).sqrt()
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - sqrt_1ma * eps) / sqrt_a
    elif prediction_type == "v_prediction":
        x0 = sqrt_a * sample - sqrt_1ma * model_output
        eps = sqrt_a * model_output + sqrt_1ma * sample
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - sqrt_a * x0) / sqrt_1ma
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    return x0, eps


def ddim_move(model_output, sample, a_t, a_s, prediction_type: str) -> torch.Tensor:
    """Deterministic (eta = 0) DDIM transport of ``sample`` from level ``a_t`` to level ``a_s``."""
    x0, eps = x0_and_eps(model_output, sample, a_t, prediction_type)
    return a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps


def guided(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps_u + w (eps_c - eps_u)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


class DDIMSchedule:
    """The T timesteps of a DDIM run and their noise levels, read from a diffusers scheduler.

    Index i = 0 is the noisiest step (the sampling order); ``alpha(i)`` is the level at step i and
    ``alpha_prev(i)`` the level the sampling step i lands on (``final_alpha_cumprod`` after the last).
    """

    def __init__(self, scheduler: DDIMScheduler, num_steps: int):
        scheduler.set_timesteps(num_steps)
        self.num_steps = num_steps
        self.timesteps = scheduler.timesteps.clone()
        self.alphas_cumprod = scheduler.alphas_cumprod.clone().double()
        self.final_alpha = torch.as_tensor(scheduler.final_alpha_cumprod).double()
        self.prediction_type = scheduler.config.prediction_type
        # Per device: the timesteps and the float32 levels of every step, copied there once per run, so a
        # step indexes tensors already on the device instead of copying two scalars from the host.
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def alpha(self, i: int) -> torch.Tensor:
        return self.alphas_cumprod[int(self.timesteps[i])]

    def alpha_prev(self, i: int) -> torch.Tensor:
        return self.alphas_cumprod[int(self.timesteps[i + 1])] if i + 1 < self.num_steps else self.final_alpha

    def on_device(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(timesteps, alpha(i) for every i, alpha_prev(i) for every i) on ``device``, levels in float32;
        made once per device and schedule."""
        device = torch.device(device)
        if device not in self._on_device:
            steps = range(self.num_steps)
            alphas = torch.stack([self.alpha(i) for i in steps]).to(torch.float32)
            prevs = torch.stack([self.alpha_prev(i) for i in steps]).to(torch.float32)
            self._on_device[device] = (self.timesteps.to(device), alphas.to(device), prevs.to(device))
        return self._on_device[device]

    def timestep(self, i: int, device: torch.device | str) -> torch.Tensor:
        """The timestep of sampling step i, as a 0-d tensor already on ``device``."""
        return self.on_device(device)[0][i]

    def sample_step(self, model_output: torch.Tensor, sample: torch.Tensor, i: int) -> torch.Tensor:
        """z_t -> z_{t-1} at sampling step i."""
        _, alphas, prevs = self.on_device(sample.device)
        return ddim_move(model_output, sample, alphas[i], prevs[i], self.prediction_type)

    def invert_step(self, model_output: torch.Tensor, sample: torch.Tensor, i: int) -> torch.Tensor:
        """z_{t-1} -> z_t: the reverse of ``sample_step(i)``, using the UNet evaluated at timestep i.

        The model output is interpreted at level alpha(i) for v/sample predictions (it was computed at
        that timestep); the latent itself sits at alpha_prev(i), as in Null-text's inversion.
        """
        _, alphas, prevs = self.on_device(sample.device)
        a_here, a_next = prevs[i], alphas[i]
        if self.prediction_type == "epsilon":
            return ddim_move(model_output, sample, a_here, a_next, "epsilon")
        _, eps = x0_and_eps(model_output.float(), sample.float(), a_next, self.prediction_type)
        return ddim_move(eps, sample, a_here, a_next, "epsilon")


def make_ddim_scheduler(config: dict) -> DDIMScheduler:
    """A DDIM scheduler with the settings inversion needs, keeping the model's betas and prediction type.

    ``steps_offset`` is 0, as in the released StyleDiffusion code, Null-text's notebook and
    PnPInversion (all build ``DDIMScheduler(beta_start=0.00085, beta_end=0.012, ...,
    clip_sample=False, set_alpha_to_one=False)`` and so take diffusers' default 0, whatever the SD
    folder's own scheduler config says): T = 50 runs t = 980, 960, ..., 0 and T = 30 runs
    t = 957, 924, ..., 0 (``leading`` spacing, step 1000 // T).
    """
    overrides = dict(clip_sample=False, set_alpha_to_one=False, steps_offset=0)
    return DDIMScheduler.from_config({**dict(config), **overrides})

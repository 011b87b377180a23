"""UNet calls with explicit attention state, DDIM inversion, and plain guided sampling."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from .attention_control import BatchLayout, CrossAttentionRecorder, controlled, install_attention_control
from .ddim import DDIMSchedule, guided
from .models import ModelBundle


def predict(bundle: ModelBundle, schedule: DDIMSchedule, latents: torch.Tensor, i: int, text: torch.Tensor,
            layout: BatchLayout, values: torch.Tensor | None = None, keys: torch.Tensor | None = None) -> torch.Tensor:
    """UNet output (fp32, on the model's device) at sampling step i; ``values`` (``keys``) replaces the
    cross-attention value (key) input per row. Inputs are moved to the model's device and dtype (a no-op
    for tensors already there, the hot loops' case); the timestep comes from the schedule's device copy."""
    state = install_attention_control(bundle.unet)
    state.set(step=i, layout=layout, latent_hw=tuple(latents.shape[-2:]), num_steps=schedule.num_steps)
    dev, dt, family = bundle.device, bundle.dtype, bundle.family
    # SDXL: the prompt embedding's pooled row and the size become added_cond_kwargs (families.py); None elsewhere
    text, added = family.unet_conditioning(bundle, text.to(dev), latents.shape[-2:])
    kwargs = {"value_states": family.token_rows(values).to(dev, dt)} if values is not None else None
    if keys is not None:
        kwargs = {**(kwargs or {}), "key_states": family.token_rows(keys).to(dev, dt)}
    t = schedule.timestep(i, dev)
    autocast = nullcontext() if bundle.autocast_dtype is None else torch.autocast(dev.type, bundle.autocast_dtype)
    with autocast:  # fp32 weights, UNet under autocast (a benchmark's precision variant)
        out = bundle.unet(latents.to(dev, dt), t, encoder_hidden_states=text.to(dev, dt),
                          cross_attention_kwargs=kwargs, added_cond_kwargs=added).sample
    return out.float()


@dataclass
class InversionTrajectory:
    """z*_0 ... z*_T of a DDIM inversion (index k = k steps of noise) and the reference maps A*.

    ``maps[i]`` holds, for sampling step i, the mid-low cross-attention maps of the conditional
    branch recorded when the inversion evaluated the UNet at that step's timestep.
    """

    latents: list[torch.Tensor]
    maps: dict[int, list[torch.Tensor]]

    @property
    def z_T(self) -> torch.Tensor:
        return self.latents[-1]

    def target_for_step(self, i: int) -> torch.Tensor:
        """The latent sampling step i should land on: z*_{T-i-1}."""
        return self.latents[len(self.latents) - 2 - i]


@torch.no_grad()
def ddim_inversion(bundle: ModelBundle, schedule: DDIMSchedule, z0: torch.Tensor, cond: torch.Tensor,
                   record_maps: bool = True, progress: bool = True,
                   recorder: CrossAttentionRecorder | None = None) -> InversionTrajectory:
    """Invert z0 with the source prompt at guidance 1 (conditional branch only, no learned values).

    ``recorder``: a fresh recorder of the reference maps A* to use instead of ``CrossAttentionRecorder()``
    (benchmarks pass one that also asks for explicit attention in every layer)."""
    state = install_attention_control(bundle.unet)
    if not record_maps:
        recorder = None
    elif recorder is None:
        recorder = CrossAttentionRecorder()
    z0 = z0.to(bundle.device)
    latents, z = [z0], z0
    T = schedule.num_steps
    with controlled(state, recorder):
        for i in tqdm(range(T - 1, -1, -1), desc="DDIM inversion", disable=not progress, leave=False):
            eps = predict(bundle, schedule, z, i, cond, BatchLayout.single())
            z = schedule.invert_step(eps, z, i)
            latents.append(z)
    return InversionTrajectory(latents, recorder.maps if recorder else {})


@torch.no_grad()
def guided_sampling(bundle: ModelBundle, schedule: DDIMSchedule, z_T: torch.Tensor, cond: torch.Tensor,
                    uncond: torch.Tensor, guidance_scale: float, progress: bool = False,
                    step_callback: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Plain classifier-free-guided DDIM sampling from z_T (one row per prompt); no attention control.
    ``step_callback(i, z)`` gets the latents after every step and returns them."""
    n = cond.shape[0]
    z_T = z_T.to(bundle.device)
    z = z_T.expand(n, -1, -1, -1) if z_T.shape[0] == 1 else z_T
    text = torch.cat([uncond.to(bundle.device).expand(n, -1, -1), cond.to(bundle.device)])
    for i in tqdm(range(schedule.num_steps), desc="sampling", disable=not progress, leave=False):
        eps_u, eps_c = predict(bundle, schedule, torch.cat([z, z]), i, text, BatchLayout.guided(n)).chunk(2)
        z = schedule.sample_step(guided(eps_u, eps_c, guidance_scale), z, i)
        if step_callback is not None:
            z = step_callback(i, z)
    return z

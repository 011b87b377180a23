"""Shared pieces of the inversion/edit methods: the edit-loop hooks every inversion needs, the
checkpoint round trip of optimising inversions, and small option helpers.

How each inversion changes the edit (P2P, FPE, MasaCtrl, PnP, word swap all run through
``editing.run_edit`` with ``InversionHooks``):
- Null-text: the unconditional rows use the optimised embedding of step i;
- NPI / SPDInv / ProxNPI: the unconditional rows use the SOURCE prompt's embedding (both prompts);
- ProxNPI: the target's guidance difference is soft-thresholded and the latents are pulled toward
  the inversion trajectory where the edit is inactive (see ``npi.py``);
- DirectInversion: after every step the stored offset is added to the source row only.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..checkpoint import check_identity, read_checkpoint, save_checkpoint
from ..editing import EditHooks
from ..errors import UserError
from ..inversion import identity
from .registry import OPTIONS, Inverted, MethodContext

# Every registered inversion; an edit that works with any inversion lists this tuple.
ALL_INVERSIONS = ("stylediffusion", "ddim", "nulltext", "npi", "proxnpi", "directinv", "spdinv", "generated")
REAL_IMAGE_INVERSIONS = tuple(n for n in ALL_INVERSIONS if n != "generated")


def option(ctx: MethodContext, name: str):
    """The value of the declared method option ``name`` (``register_*(options=...)``): the caller's
    value checked and converted by the declaration, or its default."""
    declared = OPTIONS[name]
    value = ctx.options.get(name)
    return declared.default if value is None else declared.convert(value)


def soft_threshold(x: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """The proximal map of the L1 norm: sign(x) max(|x| - threshold, 0)."""
    return torch.sign(x) * (x.abs() - threshold).clamp_min(0)


class InversionHooks(EditHooks):
    """Turns what an ``Inverted`` carries into per-step changes of the edit loop (see module doc)."""

    def __init__(self, inv: Inverted, on_step: Callable[[int, torch.Tensor], None] | None = None):
        self.inv = inv
        self.on_step = on_step
        self.offsets = inv.extras.get("latent_offsets")  # (T, C, h, w): DirectInversion
        self.negative_prompt = bool(inv.extras.get("negative_prompt"))
        self.prox = inv.extras.get("prox")  # ProxNPI settings
        self.timesteps = inv.extras.get("timesteps")
        self.edit_masks: list[torch.Tensor] = []

    @property
    def active(self) -> bool:
        """Whether these hooks change or observe anything at all."""
        return (self.inv.uncond_embeddings is not None or self.offsets is not None or self.negative_prompt
                or self.prox is not None or self.on_step is not None)

    def text(self, i, text):
        if self.inv.uncond_embeddings is not None:
            u = self.inv.uncond_embeddings[i].to(text)
            return torch.cat([u.expand(2, -1, -1), text[2:]])
        if self.negative_prompt:
            return torch.cat([text[2:3], text[2:3], text[2:]])
        return text

    def guide(self, i, eps_u, eps_c, z, guidance_scale):
        if self.prox is None:
            return super().guide(i, eps_u, eps_c, z, guidance_scale)
        delta = eps_c - eps_u
        flat = delta.abs().flatten(1)
        threshold = flat.quantile(float(self.prox["quantile"]), dim=1).view(-1, *([1] * (delta.dim() - 1)))
        mask = (delta.abs() > threshold).float()
        mask[0] = 0.0  # the source row is not edited (its difference is zero under NPI)
        self.edit_masks.append(mask)
        return eps_u + guidance_scale * soft_threshold(delta, threshold)

    def after_step(self, i, z):
        if self.offsets is not None:
            z = torch.cat([z[:1] + self.offsets[i].to(z), z[1:]])
        if self.prox is not None and self.edit_masks:
            t = int(self.timesteps[i])
            recon_t = int(self.prox["recon_t"])
            if (recon_t > 0 and t < recon_t) or (recon_t < 0 and t > -recon_t):
                target = self.inv.trajectory[len(self.inv.trajectory) - 2 - i].to(z)
                keep = 1 - self.edit_masks[-1]  # pull back only where the edit is inactive
                z = z - float(self.prox["recon_lr"]) * (z - target) * keep
        if self.on_step is not None:
            self.on_step(i, z)
        return z


def learned_embedding(inv: Inverted) -> str:
    """Where a StyleDiffusion inversion's learned embedding goes: "value" (default), "key" or "key_value"."""
    return (inv.metadata.get("train_config") or {}).get("embedding", "value")


def hooks_for(ctx: MethodContext, inv: Inverted) -> InversionHooks:
    return InversionHooks(inv, ctx.options.get("on_step"))


def checkpointed(ctx: MethodContext, method: str, settings: dict,
                 compute: Callable[[], tuple[dict[str, torch.Tensor], dict]]) -> tuple[dict[str, torch.Tensor], dict]:
    """Load ``method``'s tensors from ``ctx.checkpoint`` when it matches this image, prompt, model, T and
    settings; otherwise compute them and (when a checkpoint path is given) save them atomically."""
    ident = identity(ctx.bundle, ctx.image, ctx.source, ctx.num_steps)
    path = ctx.checkpoint
    if path is not None and path.is_file():
        tensors, meta = read_checkpoint(path)
        check_identity(meta, ident, path)
        if meta.get("method") != method:
            raise UserError(f"checkpoint '{path}' holds a {meta.get('method', 'stylediffusion')!r} inversion, not "
                            f"{method!r}: pass another --checkpoint or delete it.")
        if meta.get("settings") != settings:
            raise UserError(f"checkpoint '{path}' was made with other {method} settings ({meta.get('settings')}, "
                            f"this run: {settings}); delete it or pass another --checkpoint.")
        return tensors, meta
    tensors, extra = compute()
    meta = {**ident, "method": method, "settings": settings, "untrained_model": ctx.bundle.untrained, **extra}
    if path is not None:
        save_checkpoint(path, tensors, meta)
    return tensors, meta


def stack(latents: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([z.detach().cpu() for z in latents])


def unstack(t: torch.Tensor, device) -> list[torch.Tensor]:
    return [t[k:k + 1].to(device) for k in range(t.shape[0])]

"""Shared pieces of the inversion and edit methods: declared options, the checkpoint round trip of the
optimising inversions (``Inversion.save`` files), and where StyleDiffusion's learned embedding goes.

What each inversion changes in the edit loop is its own business (``InversionMethod.edit_hooks`` in
its module: Null-text's embeddings, NPI's negative prompt, ProxNPI's proximal guidance,
DirectInversion's offsets; StyleDiffusion's learned values through ``edit_inputs``).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..checkpoint import check_identity
from ..errors import UserError
from ..inversion import identity
from ..results import read_inversion
from .registry import OPTIONS, Inversion, MethodContext


def option(ctx: MethodContext, name: str):
    """The value of the declared method option ``name`` (a method's ``options``): the caller's
    value checked and converted by the declaration, or its default."""
    declared = OPTIONS[name]
    value = ctx.options.get(name)
    return declared.default if value is None else declared.convert(value)


def learned_embedding(inv: Inversion) -> str:
    """Where a StyleDiffusion inversion's learned embedding goes: "value" (default), "key" or "key_value"."""
    return (inv.metadata.get("train_config") or {}).get("embedding", "value")


def checkpointed(ctx: MethodContext, method: str, settings: dict, compute: Callable[[], Inversion]) -> Inversion:
    """Load ``method``'s inversion from ``ctx.checkpoint`` (an ``Inversion.save`` file, tensors on the
    CPU) when it was made by this method for this image, prompt, model, T and settings; otherwise
    compute it and (when a checkpoint path is given) save it atomically. Either way the inversion's
    metadata holds the identity and settings, and it records what it was made from."""
    ident = {**identity(ctx.bundle, ctx.image, ctx.source, ctx.num_steps), "method": method}
    path = ctx.checkpoint
    if path is not None and path.is_file():
        tensors, meta = read_inversion(path)
        check_identity(meta, ident, path)
        if meta.get("settings") != settings:
            raise UserError(f"checkpoint '{path}' was made with other {method} settings ({meta.get('settings')}, "
                            f"this run: {settings}); delete it or pass another --checkpoint.")
        return Inversion.from_file(tensors, meta, path).record_origin(ctx.bundle, ctx.image, ctx.source,
                                                                      ctx.num_steps, ctx.options)
    inv = compute()
    inv.metadata = {**ident, "settings": settings, "untrained_model": ctx.bundle.untrained, **inv.metadata}
    inv.record_origin(ctx.bundle, ctx.image, ctx.source, ctx.num_steps, ctx.options)
    if path is not None:
        inv.save(path)
    return inv


def stack(latents: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([z.detach().cpu() for z in latents])


def unstack(t: torch.Tensor, device) -> list[torch.Tensor]:
    t = t.to(device)  # one copy to the device, not one per latent
    return [t[k:k + 1] for k in range(t.shape[0])]

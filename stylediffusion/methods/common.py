"""Shared pieces of the inversion and edit methods: declared options, the checkpoint round trip of the
optimising inversions, and where StyleDiffusion's learned embedding goes.

What each inversion changes in the edit loop is its own business (``InversionMethod.edit_hooks`` in
its module: Null-text's embeddings, NPI's negative prompt, ProxNPI's proximal guidance,
DirectInversion's offsets; StyleDiffusion's learned values through ``edit_inputs``).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..checkpoint import check_identity, read_checkpoint, save_checkpoint
from ..errors import UserError
from ..inversion import identity
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
    t = t.to(device)  # one copy to the device, not one per latent
    return [t[k:k + 1] for k in range(t.shape[0])]

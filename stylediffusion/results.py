"""The result of every inversion method, and its file format.

An ``Inversion`` holds z*_T and whatever the method's edits need (StyleDiffusion's mapping networks
and image features, Null-text's per-step embeddings, a DDIM trajectory, DirectInversion's offsets...),
plus what it was made from (image, source prompt, T, model) so that it can be saved, loaded in another
session and edited without the original image file. Fields a method does not use stay None.

On disk it is a checkpoint like every other one here (``checkpoint.save_checkpoint``: safetensors +
JSON sidecar, written atomically, never pickled); ``LAYOUT`` marks a file written by ``save``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .checkpoint import read_checkpoint, save_checkpoint
from .errors import UserError
from .image_io import image_sha256
from .mapping import MappingConfig, MappingNetworks

LAYOUT = "inversion-v1"


def _json_ready(value, what: str):
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} cannot be stored as JSON: {err}") from err


@dataclass
class Inversion:
    """One image inverted by one method: everything an edit needs, and what it was made from."""

    method: str
    z0: torch.Tensor
    z_T: torch.Tensor
    mappers: MappingNetworks | None = None  # StyleDiffusion's M_0..M_{T-1}
    image_features: torch.Tensor | None = None  # E(x), StyleDiffusion
    uncond_embeddings: list[torch.Tensor] | None = None  # per step (Null-text)
    cond_embedding: torch.Tensor | None = None
    trajectory: list[torch.Tensor] | None = None  # z*_0..z*_T
    extras: dict = field(default_factory=dict)  # method-specific: tensors and JSON values
    metadata: dict = field(default_factory=dict)  # the method's own record (losses, settings, identity)
    # What it was made from; set by the editor (``api.StyleDiffusionEditor.invert``).
    source: str | None = None
    num_steps: int | None = None
    image: torch.Tensor | None = None  # (1, 3, S, S) in [-1, 1]; None for a generation
    model: dict = field(default_factory=dict)  # {"model_id", "model_fingerprint"}
    options: dict = field(default_factory=dict)  # the method options it was made with (JSON values)

    def to(self, device) -> "Inversion":
        """A copy whose tensors are on ``device`` (the mapping networks are moved, not copied)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self, z0=move(self.z0), z_T=move(self.z_T), image_features=move(self.image_features),
            mappers=None if self.mappers is None else self.mappers.to(device),
            uncond_embeddings=None if self.uncond_embeddings is None else [move(u) for u in self.uncond_embeddings],
            cond_embedding=move(self.cond_embedding),
            trajectory=None if self.trajectory is None else [move(z) for z in self.trajectory],
            extras={k: move(v) if isinstance(v, torch.Tensor) else v for k, v in self.extras.items()},
            image=move(self.image))

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (safetensors) and its ``.json`` sidecar atomically; ``Inversion.load`` reads it back."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise UserError(f"save an inversion to a '.safetensors' file, not '{path.name}'.")
        tensors: dict[str, torch.Tensor] = {"z0": self.z0, "z_T": self.z_T}
        meta = {"layout": LAYOUT, "method": self.method, "prompt": self.source, "num_ddim_steps": self.num_steps,
                **{k: self.model.get(k) for k in ("model_id", "model_fingerprint")},
                "options": _json_ready({k: v for k, v in self.options.items() if not callable(v)}, "an option"),
                "method_metadata": _json_ready(self.metadata, "the method's metadata")}
        if self.image is not None:
            # the pixels came from 8-bit values (image_io), so uint8 stores them exactly
            tensors["image"] = ((self.image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if self.mappers is not None:
            tensors.update({f"mappers.{k}": v for k, v in self.mappers.state_dict().items()})
            meta["mapping_config"] = self.mappers.cfg.to_dict()
            meta["mapping_steps"] = len(self.mappers)
        if self.image_features is not None:
            tensors["image_features"] = self.image_features
        if self.uncond_embeddings is not None:
            tensors.update({f"uncond.{i}": u for i, u in enumerate(self.uncond_embeddings)})
            meta["uncond_steps"] = len(self.uncond_embeddings)
        if self.cond_embedding is not None:
            tensors["cond_embedding"] = self.cond_embedding
        if self.trajectory is not None:
            tensors["trajectory"] = torch.cat([z.detach().cpu() for z in self.trajectory])
        meta["extras"] = {}
        for key, value in self.extras.items():
            if isinstance(value, torch.Tensor):
                tensors[f"extras.{key}"] = value
            else:
                meta["extras"][key] = _json_ready(value, f"extras[{key!r}]")
        if self.image is not None:
            meta["image_sha256"] = image_sha256(self.image)
        return save_checkpoint(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> "Inversion":
        """Read a file written by ``save`` (tensors on the CPU); a damaged or foreign file is a ``UserError``."""
        tensors, meta = read_checkpoint(path)
        if meta.get("layout") != LAYOUT:
            raise UserError(f"'{path}' is a command-line checkpoint, which does not hold the image it was trained for; "
                            f"load it with editor.invert(image, prompt, method=..., checkpoint='{path}').")
        try:
            mappers = None
            if "mapping_config" in meta:
                mappers = MappingNetworks(MappingConfig(**meta["mapping_config"]), int(meta["mapping_steps"]))
                mappers.load_state_dict({k[len("mappers."):]: v for k, v in tensors.items() if k.startswith("mappers.")})
                mappers.eval()
            uncond = None
            if "uncond_steps" in meta:
                uncond = [tensors[f"uncond.{i}"] for i in range(int(meta["uncond_steps"]))]
            trajectory = None
            if "trajectory" in tensors:
                trajectory = [z[None] for z in tensors["trajectory"]]
            extras = dict(meta.get("extras") or {})
            extras.update({k[len("extras."):]: v for k, v in tensors.items() if k.startswith("extras.")})
            image = tensors["image"].float() / 127.5 - 1.0 if "image" in tensors else None
            return cls(meta["method"], tensors["z0"], tensors["z_T"], mappers=mappers,
                       image_features=tensors.get("image_features"), uncond_embeddings=uncond,
                       cond_embedding=tensors.get("cond_embedding"), trajectory=trajectory, extras=extras,
                       metadata=dict(meta.get("method_metadata") or {}), source=meta["prompt"],
                       num_steps=int(meta["num_ddim_steps"]), image=image,
                       model={k: meta.get(k) for k in ("model_id", "model_fingerprint")},
                       options=dict(meta.get("options") or {}))
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise UserError(f"inversion file '{path}' is damaged: its tensors do not match its metadata "
                            f"({type(err).__name__}: {err}).") from err

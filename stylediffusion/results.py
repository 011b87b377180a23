"""The result of every inversion method, and THE inversion file format.

An ``Inversion`` holds z*_T and whatever the method's edits need (StyleDiffusion's mapping networks
and image features, Null-text's per-step embeddings, a DDIM trajectory, DirectInversion's offsets...),
plus what it was made from (image, source prompt, T, model) so that it can be saved, loaded in another
session and edited without the original image file. Fields a method does not use stay None.

On disk (``save`` / ``load``, layout ``LAYOUT``) it is one safetensors file plus its ``.json`` sidecar,
written atomically by ``checkpoint.save_checkpoint``, never pickled; the command line, every method's
checkpoint, the benchmark runners, the API and the demo all write and read this one layout. The
metadata is the method's own record (losses, settings and the identity it was made for, the keys of
``checkpoint.IDENTITY_KEYS``) with what the inversion was made from on top, and the layout's own
bookkeeping under ``"inversion"``. A *partial* file (``"complete": false``) is StyleDiffusion's
training in progress: its first ``trained_steps`` mapping networks and the pivot latent
(``extras.pivot``), from which ``inversion.train_inversion`` resumes; ``load`` refuses it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import FORMAT, read_checkpoint, save_checkpoint
from .errors import UserError
from .image_io import image_sha256
from .mapping import MappingConfig, MappingNetworks

LAYOUT = "inversion-v2"
# What earlier versions wrote: ``Inversion.save``'s first layout, and (no layout key) the command line's
# StyleDiffusion checkpoints and ``methods.common.checkpointed``'s files of the other inversions.
OLD_LAYOUTS = ("inversion-v1", None)


def old_format_error(path) -> UserError:
    return UserError(f"'{path}' is an inversion in an old file format of this toolkit, which it no longer reads: "
                     f"train it again (--retrain on the command line, with or without --is_train True; in Python "
                     f"delete the file, then editor.invert(image, prompt, ..., checkpoint='{path}')).")


def _is_old(meta: dict) -> bool:
    return meta.get("format") == FORMAT and meta.get("layout") in OLD_LAYOUTS


def refuse_old_format(path) -> None:
    """Raise ``old_format_error`` when ``path`` is an inversion file of an earlier layout; reads only the
    header, and leaves every other problem (missing, damaged, foreign) to the load that follows."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["stylediffusion"])
    except Exception:  # unreadable here: the real load says what is wrong
        return
    if isinstance(meta, dict) and _is_old(meta):
        raise old_format_error(path)


def read_inversion(path, partial: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of an inversion file (``partial``: of a training in progress, else of a
    finished one); an old layout, a damaged or foreign file is a one-line ``UserError``."""
    tensors, meta = read_checkpoint(path)
    if _is_old(meta):
        raise old_format_error(path)
    if meta.get("layout") != LAYOUT:
        raise UserError(f"'{path}' has the inversion layout {meta.get('layout')!r}, which this version does not "
                        f"know (it reads {LAYOUT!r}): it was written by another version of this toolkit.")
    complete, info = meta.get("complete"), meta.get("inversion")
    if not isinstance(complete, bool) or not isinstance(info, dict) or not isinstance(info.get("record"), list):
        raise UserError(f"inversion file '{path}' is damaged: its metadata lacks 'complete' or 'inversion'; "
                        f"delete it and train again.")
    if complete == partial:
        if partial:
            raise UserError(f"'{path}' is a finished inversion, not a partial one.")
        raise UserError(
            f"'{path}' is an unfinished inversion ({meta.get('trained_steps')}/{meta.get('num_ddim_steps')} "
            f"steps trained): finish it by training again with the same settings and the final file's "
            f"path (--is_train True on the command line, editor.invert(..., checkpoint=...) in Python)."
        )
    return tensors, meta


def method_record(meta: dict) -> dict:
    """The method's own record (``Inversion.metadata``) inside a file's metadata."""
    return {k: meta[k] for k in meta["inversion"]["record"] if k in meta}


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

    def record_origin(self, bundle, image: torch.Tensor | None, prompt: str, num_steps: int,
                      options: dict | None = None) -> "Inversion":
        """Set what this inversion was made from (what a file of it holds besides the tensors); returns it."""
        self.source, self.num_steps, self.image = prompt, num_steps, image
        self.model = {"model_id": bundle.model_id, "model_fingerprint": bundle.fingerprint}
        self.options = {k: v for k, v in (options or {}).items() if not callable(v)}
        return self

    def save(self, path: str | Path, trained_steps: int | None = None) -> Path:
        """Write ``path`` (safetensors) and its ``.json`` sidecar atomically; ``Inversion.load`` reads it back.

        ``trained_steps``: a partial file of StyleDiffusion's training, whose first ``trained_steps``
        mapping networks are trained (only those are stored); None: a finished inversion."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise UserError(f"save an inversion to a '.safetensors' file, not '{path.name}'.")
        record = _json_ready(self.metadata, "the method's metadata")
        tensors: dict[str, torch.Tensor] = {"z0": self.z0, "z_T": self.z_T}
        info = {"record": sorted(record), "extras": {},
                "options": _json_ready({k: v for k, v in self.options.items() if not callable(v)}, "an option")}
        meta = {**record, "layout": LAYOUT, "method": self.method, "prompt": self.source,
                "num_ddim_steps": self.num_steps, **{k: self.model.get(k) for k in ("model_id", "model_fingerprint")},
                "complete": trained_steps is None, "inversion": info}
        if trained_steps is not None:
            meta["trained_steps"] = int(trained_steps)
        if self.image is not None:
            # the pixels came from 8-bit values (image_io), so uint8 stores them exactly
            tensors["image"] = ((self.image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            meta["image_sha256"] = image_sha256(self.image)
        if self.mappers is not None:
            stored = len(self.mappers) if trained_steps is None else int(trained_steps)
            tensors.update({f"mappers.{k}": v for k, v in self.mappers.state_dict().items()
                            if int(k.split(".")[1]) < stored})
            meta["mapping_config"] = self.mappers.cfg.to_dict()
            info["mapping_steps"] = len(self.mappers)
        if self.image_features is not None:
            tensors["image_features"] = self.image_features
        if self.uncond_embeddings is not None:
            tensors.update({f"uncond.{i}": u for i, u in enumerate(self.uncond_embeddings)})
            info["uncond_steps"] = len(self.uncond_embeddings)
        if self.cond_embedding is not None:
            tensors["cond_embedding"] = self.cond_embedding
        if self.trajectory is not None:
            tensors["trajectory"] = torch.cat([z.detach().cpu() for z in self.trajectory])
        for key, value in self.extras.items():
            if isinstance(value, torch.Tensor):
                tensors[f"extras.{key}"] = value
            else:
                info["extras"][key] = _json_ready(value, f"extras[{key!r}]")
        return save_checkpoint(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> "Inversion":
        """Read a file written by ``save`` (by the API, the command line, a method's checkpoint, a runner or
        the demo; tensors on the CPU); an old, unfinished, damaged or foreign file is a ``UserError``."""
        tensors, meta = read_inversion(path)
        return cls.from_file(tensors, meta, path)

    @classmethod
    def from_file(cls, tensors: dict[str, torch.Tensor], meta: dict, path: str | Path) -> "Inversion":
        """The inversion in the contents of a finished file (``read_inversion``)."""
        try:
            info = meta["inversion"]
            mappers = None
            if "mapping_steps" in info:
                mappers = MappingNetworks(MappingConfig(**meta["mapping_config"]), int(info["mapping_steps"]))
                mappers.load_state_dict(
                    {k[len("mappers.") :]: v for k, v in tensors.items() if k.startswith("mappers.")}
                )
                mappers.eval()
            uncond = None
            if "uncond_steps" in info:
                uncond = [tensors[f"uncond.{i}"] for i in range(int(info["uncond_steps"]))]
            trajectory = None
            if "trajectory" in tensors:
                trajectory = [z[None] for z in tensors["trajectory"]]
            extras = dict(info.get("extras") or {})
            extras.update({k[len("extras."):]: v for k, v in tensors.items() if k.startswith("extras.")})
            image = tensors["image"].float() / 127.5 - 1.0 if "image" in tensors else None
            return cls(meta["method"], tensors["z0"], tensors["z_T"], mappers=mappers,
                       image_features=tensors.get("image_features"), uncond_embeddings=uncond,
                       cond_embedding=tensors.get("cond_embedding"), trajectory=trajectory, extras=extras,
                       metadata=method_record(meta), source=meta["prompt"],
                       num_steps=int(meta["num_ddim_steps"]), image=image,
                       model={k: meta.get(k) for k in ("model_id", "model_fingerprint")},
                       options=dict(info.get("options") or {}))
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
            raise UserError(f"inversion file '{path}' is damaged: its tensors do not match its metadata "
                            f"({type(err).__name__}: {err}).") from err

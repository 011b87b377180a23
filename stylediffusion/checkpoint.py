"""The container of inversion files: tensors in safetensors, metadata as JSON, written atomically; and
the checks of what a stored inversion was made for.

Nothing here pickles or unpickles: a checkpoint is data only. The JSON metadata is stored both in
the safetensors header (so the file is self-describing) and in a sidecar ``.json`` for people. The
one layout of inversions inside this container is ``results.Inversion.save`` / ``load``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .defaults import VARIANT, VARIANTS
from .errors import UserError
from .files import atomic_write, atomic_write_text

FORMAT = "stylediffusion-inversion"
FORMAT_VERSION = 1
# Keys that must match between a checkpoint and the run that wants to use it (see identity.py for
# what the model fingerprint covers). The model's name (model_id) is recorded, not compared: the same
# files loaded from another folder or by hub id are the same model.
IDENTITY_KEYS = {
    "method": "inversion method",
    "model_identity_version": "model identity scheme",
    "image_sha256": "image",
    "prompt": "source prompt",
    "model_fingerprint": "model (configuration, noise schedule or weights)",
    "num_ddim_steps": "number of DDIM steps (T)",
    "variant": "mapping-network variant (--variant)",
    "train_config": "training settings",
    "settings": "method settings",
}
MODEL_IDENTITY_VERSION = 2


def _save_safetensors(tensors: dict, path: str, metadata: dict) -> None:
    """safetensors' ``save_file``; its I/O failures (reported as its own error type, naming the OS error)
    become the ``OSError`` they are, so that a full disk is answered like any other file-system fault."""
    try:
        save_file(tensors, path, metadata=metadata)
    except Exception as err:  # only I/O errors are translated, the rest is re-raised
        found = re.search(r"os error (\d+)", str(err))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from err


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict) -> Path:
    path = Path(path)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **metadata}
    blob = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    # files.atomic_write: a full disk or read-only folder is one line, the temporary is removed and the
    # previous file (e.g. the last good partial inversion) stays
    atomic_write(path, lambda tmp: _save_safetensors(blob, str(tmp), {"stylediffusion": json.dumps(meta)}))
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata; a damaged or foreign file is a ``UserError`` saying so."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist: train it first with --is_train True.")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(header["stylediffusion"])
    except (KeyError, json.JSONDecodeError) as err:
        raise UserError(
            f"checkpoint '{path}' has no StyleDiffusion metadata: it was not written by this toolkit."
        ) from err
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise UserError(
            f"checkpoint '{path}' is corrupt or truncated ({type(err).__name__}: {err}); "
            f"delete it and train again with --is_train True."
        ) from err
    if not isinstance(meta, dict):
        raise UserError(f"checkpoint '{path}' has metadata of the wrong shape ({type(meta).__name__}, not an "
                        f"object): it was not written by this toolkit.")
    if meta.get("format") != FORMAT:
        raise UserError(f"checkpoint '{path}' is a {meta.get('format')!r} file, not a {FORMAT}.")
    for key, tensor in tensors.items():  # NaN/inf weights would give a blank edit with exit 0
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"checkpoint '{path}' is damaged: tensor '{key}' holds NaN or infinite values; "
                            f"delete it and train again.")
    return tensors, meta


# The metadata an inversion checkpoint must carry, with the type of each value.
_INVERSION_FIELDS = {"image_sha256": str, "prompt": str, "model_id": str, "num_ddim_steps": int,
                     "trained_steps": int, "variant": str, "mapping_config": dict, "train_config": dict}
_MAPPING_INT_FIELDS = ("image_tokens", "image_width", "text_tokens", "text_width", "hidden_layers")


def validate_inversion(tensors: dict[str, torch.Tensor], meta: dict, path: str | Path, num_steps: int,
                       latent_shape: tuple[int, ...], partial: bool = False) -> None:
    """Refuse a StyleDiffusion checkpoint whose content does not fit this run: metadata of the wrong
    type, an unknown variant, a step count out of range, or a ``z_T`` (and a partial's ``extras.pivot``)
    whose shape or dtype is not the model's latent."""
    def bad(what: str) -> UserError:
        return UserError(f"checkpoint '{path}' is damaged or foreign: {what}; delete it and train again.")

    for key, kind in _INVERSION_FIELDS.items():
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, kind):
            wanted = "a number" if kind is int else "an object" if kind is dict else "text"
            raise bad(f"metadata '{key}' is {value!r}, not {wanted}")
    if meta["variant"] not in VARIANTS:
        raise bad(f"unknown variant {meta['variant']!r} (known: {', '.join(VARIANTS)})")
    mapping = meta["mapping_config"]
    for key in _MAPPING_INT_FIELDS:
        value = mapping.get(key, 1 if key == "hidden_layers" else None)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "hidden_layers" else 1):
            raise bad(f"mapping_config '{key}' is {value!r}, not a positive whole number")
    if mapping.get("variant", VARIANT) not in VARIANTS:
        raise bad(f"mapping_config variant {mapping.get('variant')!r} is unknown")
    unknown = set(mapping) - set(_MAPPING_INT_FIELDS) - {"variant"}
    if unknown:
        raise bad(f"mapping_config has unknown keys {sorted(unknown)}")
    steps = meta["trained_steps"]
    if not 1 <= steps <= num_steps or (partial and steps == num_steps):
        raise bad(f"trained_steps is {steps} for T = {num_steps}")
    for key in ("z_T", "extras.pivot") if partial else ("z_T",):
        tensor = tensors.get(key)
        if tensor is None:
            raise bad(f"it has no '{key}' tensor")
        if tuple(tensor.shape) != tuple(latent_shape) or tensor.dtype != torch.float32:
            raise bad(f"'{key}' is {tensor.dtype} {tuple(tensor.shape)}, while this model's latent is torch.float32 "
                      f"{tuple(latent_shape)}")


def _difference(stored, wanted, prefix: str = "") -> str:
    """The first place where two JSON-like records differ, as 'key: stored vs wanted'."""
    if isinstance(stored, dict) and isinstance(wanted, dict):
        for key in sorted(set(stored) | set(wanted)):
            if stored.get(key) != wanted.get(key):
                return _difference(stored.get(key), wanted.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {stored!r} vs {wanted!r}"


def identity_mismatch(meta: dict, expected: dict) -> str | None:
    """What makes a checkpoint's metadata unfit for a run expecting ``expected``, or None."""
    try:
        check_identity(meta, expected, "")
    except UserError as err:
        return str(err)
    return None


def check_identity(meta: dict, expected: dict, path: str | Path) -> None:
    """Refuse a checkpoint made for another image, prompt, model, T or setting, naming what differs."""
    if meta.get("model_identity_version") != MODEL_IDENTITY_VERSION and "model_identity_version" in expected:
        raise UserError(f"checkpoint '{path}' was written by an older version of this toolkit, whose model "
                        f"fingerprint was not stable across processes; train it again (--retrain).")
    for key, label in IDENTITY_KEYS.items():
        if key in expected and meta.get(key) != expected[key]:
            if key == "model_fingerprint" and isinstance(meta.get("model_identity"), dict):
                detail = _difference(meta["model_identity"], expected.get("model_identity"))
            elif isinstance(expected[key], dict) and isinstance(meta.get(key), dict):
                detail = _difference(meta[key], expected[key])
            else:
                detail = f"{meta.get(key)!r}, this run: {expected[key]!r}"
            raise UserError(
                f"checkpoint '{path}' was trained for a different {label} ({detail}); train a new one "
                f"with --is_train True (--retrain) or pass the matching --checkpoint."
            )

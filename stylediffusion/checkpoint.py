"""Trained inversions on disk: tensors in safetensors, metadata as JSON, written atomically.

Nothing here pickles or unpickles: a checkpoint is data only. The JSON metadata is stored both in
the safetensors header (so the file is self-describing) and in a sidecar ``.json`` for people.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import UserError

FORMAT = "stylediffusion-inversion"
FORMAT_VERSION = 1
# Keys that must match between a checkpoint and the run that wants to use it.
IDENTITY_KEYS = {
    "image_sha256": "image",
    "prompt": "source prompt",
    "model_id": "model",
    "model_fingerprint": "model configuration",
    "num_ddim_steps": "number of DDIM steps (T)",
}


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict) -> Path:
    path = Path(path)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **metadata}
    blob = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(blob, tmp, metadata={"stylediffusion": json.dumps(meta)}))
    text = json.dumps(meta, indent=2, sort_keys=True)
    _atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text + "\n"))
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
        raise UserError(f"checkpoint '{path}' has no StyleDiffusion metadata: it was not written by this toolkit.") from err
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise UserError(f"checkpoint '{path}' is corrupt or truncated ({type(err).__name__}: {err}); "
                        f"delete it and train again with --is_train True.") from err
    if meta.get("format") != FORMAT:
        raise UserError(f"checkpoint '{path}' is a {meta.get('format')!r} file, not a {FORMAT}.")
    return tensors, meta


def check_identity(meta: dict, expected: dict, path: str | Path) -> None:
    """Refuse a checkpoint made for another image, prompt, model or T, naming what differs."""
    for key, label in IDENTITY_KEYS.items():
        if key in expected and meta.get(key) != expected[key]:
            raise UserError(
                f"checkpoint '{path}' was trained for a different {label} ({meta.get(key)!r}, this run: "
                f"{expected[key]!r}); train a new one with --is_train True or pass the matching --checkpoint."
            )

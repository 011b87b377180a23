"""A training stage on disk: ``<out>/<stage>.safetensors`` (module weights, optimiser state, torch
generator state) + ``<out>/<stage>.json`` (step, numpy generator state, losses, wall time), both
written atomically; and the stage's loss plot ``<out>/<stage>_loss.png``.

Not the package's inversion checkpoint (``stylediffusion.checkpoint``): these files hold a test-bed
training run between sessions, to be resumed or exported."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from stylediffusion.files import atomic_write, atomic_write_text


def atomic_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def _atomic_safetensors(path: str, tensors: Dict[str, torch.Tensor]) -> None:
    blob = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(blob, str(tmp)))


def _optim_tensors(opt: torch.optim.Optimizer) -> Dict[str, torch.Tensor]:
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"opt.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def _load_optim(opt: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if not key.startswith("opt."):
            continue
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def save_training_stage(out: str, stage: str, modules: Dict[str, torch.nn.Module], opt, meta: dict) -> None:
    """Write the stage's modules, optimiser and torch generator state and its ``meta`` JSON to ``out``."""
    tensors: Dict[str, torch.Tensor] = {}
    for name, mod in modules.items():
        for k, v in mod.state_dict().items():
            tensors[f"model.{name}.{k}"] = v
    tensors.update(_optim_tensors(opt))
    tensors["rng.torch"] = torch.get_rng_state()
    _atomic_safetensors(os.path.join(out, f"{stage}.safetensors"), tensors)
    atomic_json(os.path.join(out, f"{stage}.json"), meta)


def load_training_stage(out: str, stage: str, modules: Dict[str, torch.nn.Module], opt=None,
                        restore_rng: bool = True) -> Optional[dict]:
    """Load a stage written by :func:`save_training_stage` into ``modules`` (and ``opt``); its meta, or
    None when ``out`` holds no such stage."""
    st_path = os.path.join(out, f"{stage}.safetensors")
    js_path = os.path.join(out, f"{stage}.json")
    if not (os.path.exists(st_path) and os.path.exists(js_path)):
        return None
    tensors = load_file(st_path)
    for name, mod in modules.items():
        pre = f"model.{name}."
        sd = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
        mod.load_state_dict(sd)
    if opt is not None:
        _load_optim(opt, tensors)
    if restore_rng and "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    with open(js_path) as f:
        return json.load(f)


def plot_losses(out: str, stage: str, losses: List[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not losses:
        return
    y = np.asarray(losses, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(y, lw=0.6, alpha=0.4, label="step")
    k = max(1, len(y) // 50)
    if len(y) >= k:
        sm = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(sm)) + k - 1, sm, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(f"testbed {stage}")
    ax.legend()
    fig.tight_layout()
    atomic_write(os.path.join(out, f"{stage}_loss.png"), lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)

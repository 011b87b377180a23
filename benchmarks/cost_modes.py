"""The two cost structures the benchmarks compare: the released code's ("reference") and ours ("fast").

``reference`` keeps the math and changes the cost: explicit softmax attention in every layer
(``ExplicitEverywhere``, and ``ExplicitRecorder`` passed to ``ddim_inversion`` / ``train_mapping_networks``
as their ``recorder``), the CLIP image encoder re-run in every cross-attention call with learned values,
UNet weight gradients, split unconditional / conditional calls in the edit. See benchmarks/gpu_bench.py.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ptp_utils import COND, AttentionController, CrossAttentionRecorder  # noqa: E402
from stylediffusion.encoders import clip_image_features  # noqa: E402
from stylediffusion.models import ModelBundle  # noqa: E402


@dataclass
class Mode:
    name: str
    dtype: str
    explicit_attention: bool  # softmax maps materialised in every attention layer
    image_encoder_per_layer: bool  # CLIP image encoder re-run in every cross-attention call with learned values
    unet_weight_grads: bool  # UNet parameters require grad (weight gradients computed in training)
    split_branches: bool  # separate unconditional / conditional UNet calls in the edit
    tf32: bool = False
    compile: bool = False
    channels_last: bool = False


def reference_mode() -> Mode:
    return Mode("reference", "float32", explicit_attention=True, image_encoder_per_layer=True, unet_weight_grads=True,
                split_branches=True)


def fast_mode(device: torch.device, dtype: str | None, compile_unet: bool, channels_last: bool) -> Mode:
    if dtype is None:  # half precision pays on GPUs; on a CPU without AMX, bf16 kernels are slower than fp32
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    return Mode("fast", dtype, explicit_attention=False, image_encoder_per_layer=False, unet_weight_grads=False,
                split_branches=False, tf32=device.type == "cuda", compile=compile_unet, channels_last=channels_last)


class ExplicitEverywhere(AttentionController):
    """Reference cost: explicit softmax maps in every layer; edits delegated to ``inner`` where it asks."""

    def __init__(self, inner: AttentionController | None = None):
        self.inner = inner

    def needs_maps(self, place, state):
        return True

    def __call__(self, probs, place, state):
        if self.inner is None or not self.inner.needs_maps(place, state):
            return probs
        if place.is_cross and state.layout is not None and not state.layout.rows(COND):
            return probs  # an unconditional-only call (split branches): its cross-attention is never edited
        return self.inner(probs, place, state)

    def after_step(self, latents, state):
        return latents if self.inner is None else self.inner.after_step(latents, state)


class ExplicitRecorder(CrossAttentionRecorder):
    """The mid-low cross-attention recorder, but with explicit attention in every layer (reference)."""

    def needs_maps(self, place, state):
        return True

    def __call__(self, probs, place, state):
        if place.is_cross and place.is_mid_low:
            return super().__call__(probs, place, state)
        return probs


def recorder_for(explicit_attention: bool, keep_grad: bool = False) -> CrossAttentionRecorder | None:
    """The recorder to pass to ``ddim_inversion`` / ``train_mapping_networks``: ``ExplicitRecorder`` where every
    layer must materialise its maps, else None (the core's own ``CrossAttentionRecorder``)."""
    return ExplicitRecorder(keep_grad=keep_grad) if explicit_attention else None


def add_per_layer_image_encoder(bundle: ModelBundle, image: torch.Tensor) -> list:
    """Run the CLIP image encoder again in every cross-attention call that receives learned values."""
    handles = []

    def hook(module, args, kwargs):
        if kwargs.get("value_states") is not None:
            clip_image_features(bundle, image)
        return None

    for _name, module in bundle.unet.named_modules():
        if getattr(module, "is_cross_attention", False) and hasattr(module, "processor"):
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


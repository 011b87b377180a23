"""What a trained inversion was made for, and the one function that names its file.

A checkpoint may only be reused by a run that would have produced the same tensors. That depends on
the image, the prompt, T, the training settings and the model, where "the model" means what
determines its outputs: the public configuration values of the UNet, VAE, text and image encoders,
the DDIM noise schedule and prediction type, and the weights themselves. It must not depend on what
the loading library adds to a config (diffusers' private ``_use_default_values``, whose order varies
from process to process; ``_diffusers_version``; ``transformers_version``; ``torch_dtype``; the path
the folder was loaded from) or on which keys a file spells out when their values are the defaults.

So a config is reduced to its public keys whose values differ from the class's defaults, and the
weights to a digest of a few small tensors cast to float16 (so the fp32 files and the hub's fp16
variant of one model agree, and a run in bfloat16 agrees with one in float32: the digest is taken
before the cast). The result is the same in every process, on every machine and with any diffusers
version that loads the same files.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import re
from typing import Any

import torch

from .defaults import VARIANT

# Keys that say how or by whom a config was written, not what the model computes.
_BOOKKEEPING_KEYS = frozenset({
    "transformers_version", "architectures", "torch_dtype", "dtype", "model_type", "output_hidden_states",
    "output_attentions", "return_dict", "use_return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
    "id2label", "label2id", "problem_type", "tokenizer_class", "task_specific_params", "finetuning_task",
    "tf_legacy_loss", "use_bfloat16", "pruned_heads", "tie_word_embeddings", "torchscript",
    # CLIPTextModel and CLIPVisionModel have no projection layer: SD v1-4's file lacks the key, v1-5's has it
    "projection_dim",
})
# The scheduler settings that decide which noise levels a DDIM run visits.
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "prediction_type", "steps_offset", "set_alpha_to_one", "timestep_spacing", "rescale_betas_zero_snr")
# Small tensors whose values tell two fine-tunes of one architecture apart (first match per module).
_DIGEST_PARAMETERS = {
    "unet": ("conv_in.weight", "conv_out.weight", "time_embedding.linear_1.weight"),
    "vae": ("quant_conv.weight", "post_quant_conv.weight"),
    "text_encoder": ("final_layer_norm.weight", "embeddings.position_embedding.weight"),
    "text_encoder_2": ("text_projection.weight", "final_layer_norm.weight", "embeddings.position_embedding.weight"),
    "image_encoder": ("post_layernorm.weight", "embeddings.class_embedding"),
}
# transformers 4 nests CLIP's parameters under these names, transformers 5 does not.
_WRAPPER_PREFIXES = ("text_model.", "vision_model.")
_MISSING = object()


def _plain(value: Any) -> Any:
    """JSON-comparable form: tuples become lists, numbers stay numbers."""
    return json.loads(json.dumps(value, default=str))


def _class_defaults(config, owner) -> dict:
    """Default value of every config key of ``owner`` (a diffusers model or a transformers config)."""
    if hasattr(config, "to_dict") and not isinstance(config, dict):  # transformers: the config class's own defaults
        return type(config)().to_dict()
    params = inspect.signature(type(owner).__init__).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def public_config(config, owner=None) -> dict:
    """The config values that shape the model: public keys, bookkeeping dropped, defaults left out."""
    items = config.to_dict() if hasattr(config, "to_dict") and not isinstance(config, dict) else dict(config)
    defaults = _class_defaults(config, owner) if owner is not None or hasattr(config, "to_dict") else {}
    out = {}
    for key, value in items.items():
        if key.startswith("_") or key in _BOOKKEEPING_KEYS:
            continue
        value = _plain(value)
        default = defaults.get(key, _MISSING)
        if default is not _MISSING and _plain(default) == value:
            continue
        out[key] = value
    return dict(sorted(out.items()))


def schedule_config(scheduler) -> dict:
    cfg = dict(scheduler.config)
    return {k: _plain(cfg.get(k)) for k in _SCHEDULE_KEYS}


def weights_digest(name: str, module: torch.nn.Module) -> str:
    """sha256 of a few of the module's tensors in float16 (see the module docstring)."""
    h = hashlib.sha256()
    params = {}
    for key, tensor in [*module.named_parameters(), *module.named_buffers()]:
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        params[key] = tensor
    keys = [k for k in _DIGEST_PARAMETERS.get(name, ()) if k in params] or list(params)[:1]
    for key in keys:
        tensor = params[key]
        if tensor.device.type == "meta":
            continue
        h.update(key.encode())
        h.update(tensor.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def model_identity(components: dict, digests: dict | None = None) -> dict:
    """The identity record of the frozen components (``vae``, ``unet``, ``text_encoder``,
    ``image_encoder``, ``scheduler``); ``digests`` are weight digests taken at load time, before any
    dtype cast (missing ones are taken from the modules as they are now)."""
    digests = dict(digests or {})
    record = {}
    sdxl = components.get("text_encoder_2") is not None  # SDXL: its second text tower, and how "" encodes
    for name in ("unet", "vae", "text_encoder", "image_encoder") + (("text_encoder_2",) if sdxl else ()):
        module = components[name]
        record[name] = {"class": type(module).__name__, "config": public_config(module.config, module),
                        "weights": digests.get(name) or weights_digest(name, module)}
    if sdxl:
        record["zero_empty_prompt"] = bool(components.get("zero_empty_prompt"))
    record["scheduler"] = schedule_config(components["scheduler"])
    return record


def fingerprint(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def slug(text: str) -> str:
    """A file-name-safe form of ``text``: letters, digits, '.', '_' and '-' only, never '.' or '..' alone."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.")
    return out or "x"


def checkpoint_name(case: str, model_label: str, num_steps: int, num_inner_steps: int,
                    inversion: str = "stylediffusion", options: dict | None = None,
                    trains_inner_steps: bool = False) -> str:
    """The file name of an inversion, for the CLI and every benchmark runner alike.

    Everything that changes the learned tensors and that users vary by flag is in the name, so runs
    with other settings are kept apart instead of refused: T, the method, K for the methods that train
    for K iterations (``trains_inner_steps``, ``InversionMethod.trains_inner_steps``), StyleDiffusion's
    variant and embedding, and any other method option (hashed). Settings not in the name (learning
    rate, guidance, loss switches) are in the checkpoint's identity, and a mismatch is refused.
    """
    options = {k: v for k, v in (options or {}).items() if not k.startswith("_") and not callable(v)}
    parts = [slug(case), slug(model_label), f"T{int(num_steps)}"]
    variant = options.pop("variant", VARIANT)
    embedding = options.pop("embedding", "value")
    if inversion != "stylediffusion":  # the authors' method keeps the authors' name: no method part
        parts.append(slug(inversion))
    if trains_inner_steps:
        parts.append(f"K{int(num_inner_steps)}")
    if inversion == "stylediffusion":
        parts += [slug(variant)] if variant != VARIANT else []
        parts += [slug(embedding)] if embedding != "value" else []
    if options:
        parts.append("o" + hashlib.sha256(json.dumps(_plain(options), sort_keys=True).encode()).hexdigest()[:8])
    return "_".join(parts) + ".safetensors"

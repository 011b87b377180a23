"""A StyleDiffusion inversion of one image: train it (resumably), save it, load it back safely.

Its files, finished and partial, are ``results.Inversion.save`` files like every other inversion's."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .checkpoint import MODEL_IDENTITY_VERSION, check_identity, identity_mismatch, validate_inversion
from .ddim import DDIMSchedule
from .defaults import VARIANT
from .encoders import clip_image_features, encode_latent, encode_prompts
from .errors import UserError
from .image_io import image_sha256
from .mapping import MappingConfig, MappingNetworks
from .models import ModelBundle
from .results import Inversion, method_record, read_inversion
from .sampling import ddim_inversion
from .training import TrainConfig, train_mapping_networks

logger = logging.getLogger(__name__)


def identity(bundle: ModelBundle, image: torch.Tensor, prompt: str, num_steps: int) -> dict:
    """What a checkpoint of this image was made for (compared by checkpoint.check_identity)."""
    return {"model_identity_version": MODEL_IDENTITY_VERSION, "image_sha256": image_sha256(image), "prompt": prompt,
            "model_id": bundle.model_id, "model_fingerprint": bundle.fingerprint, "model_identity": bundle.identity,
            "num_ddim_steps": num_steps}


def mapping_config(bundle: ModelBundle, features: torch.Tensor, text: torch.Tensor, variant: str) -> MappingConfig:
    """Token counts and widths from the encoders themselves (197x768 and 77x768 for SD1 + ViT-B/16)."""
    return MappingConfig(image_tokens=features.shape[1], image_width=features.shape[2],
                         text_tokens=bundle.family.text_tokens(text),
                         text_width=text.shape[2], variant=variant)


def train_inversion(bundle: ModelBundle, image: torch.Tensor, prompt: str, num_steps: int, cfg: TrainConfig,
                    checkpoint: Path | None = None, variant: str = VARIANT, resume: bool = True,
                    progress: bool = True, options: dict | None = None) -> Inversion:
    """Invert and train M_0..M_{T-1}; the result is returned in memory.

    With a ``checkpoint`` path the result is also saved there (``Inversion.save``), and training is
    resumable: after each DDIM step the progress so far (trained M_i and the pivot latent) is written to
    ``<checkpoint>.partial.safetensors`` and picked up by the next run; the final file appears only when
    training is complete. Without one nothing is written. ``options``: the method options the
    inversion records (``Inversion.options``).
    """
    schedule = DDIMSchedule(bundle.scheduler, num_steps)
    ident = identity(bundle, image, prompt, num_steps)
    z0 = encode_latent(bundle, image)
    cond = encode_prompts(bundle, [prompt])
    uncond = encode_prompts(bundle, [""])
    features = clip_image_features(bundle, image)
    mappers = MappingNetworks(mapping_config(bundle, features, cond, variant), num_steps)

    partial = None if checkpoint is None else checkpoint.with_name(checkpoint.stem + ".partial.safetensors")
    start, pivot = 0, None
    if resume and partial is not None and partial.is_file():
        try:
            tensors, meta = read_inversion(partial, partial=True)
            expected = {**ident, "method": "stylediffusion", "train_config": cfg.to_dict(), "variant": variant}
            same = identity_mismatch(meta, expected) is None and meta.get("mapping_config") == mappers.cfg.to_dict()
            if same:
                validate_inversion(tensors, meta, partial, num_steps, latent_shape(bundle), partial=True)
                start = meta["trained_steps"]
                _load_trained_mappers(mappers, tensors, start, partial)
                pivot = tensors["extras.pivot"]
                logger.info(f"resuming training from {partial} at DDIM step {start}/{num_steps}")
            else:
                logger.info(f"ignoring {partial}: it was made for another image, prompt, model or setting")
        except UserError as err:  # a damaged partial must not block training: it is overwritten as we go
            start, pivot = 0, None
            mappers = MappingNetworks(mappers.cfg, num_steps)
            logger.info(f"note: ignoring {partial} and training from the first step: {err}")

    t0 = time.perf_counter()
    trajectory = ddim_inversion(bundle, schedule, z0, cond, record_maps=cfg.attention_loss, progress=progress)
    meta = {**ident, "image_encoder_id": bundle.image_encoder_id, "variant": variant,
            "mapping_config": mappers.cfg.to_dict(), "train_config": cfg.to_dict(), "untrained_model": bundle.untrained}

    def inversion(metadata: dict, **fields) -> Inversion:
        return Inversion("stylediffusion", z0, trajectory.z_T, mappers=mappers, image_features=features,
                         metadata=metadata, **fields).record_origin(bundle, image, prompt, num_steps, options)

    def save_progress(i: int, z: torch.Tensor) -> None:
        if partial is not None and i + 1 < num_steps:
            inversion({**meta, "trained_steps": i + 1}, extras={"pivot": z}).save(partial, trained_steps=i + 1)

    reports = train_mapping_networks(bundle, schedule, trajectory, features, cond, uncond, mappers, cfg,
                                     start_step=start, z_start=pivot, on_step_done=save_progress, progress=progress)
    seconds = time.perf_counter() - t0
    meta.update(trained_steps=num_steps, train_seconds=round(seconds, 3),
                inner_iterations=sum(r.iterations for r in reports),
                final_losses=[float(f"{r.loss:.4g}") for r in reports])
    mappers.eval()
    result = inversion(meta)
    if checkpoint is None:
        return result
    result.save(checkpoint)
    if partial.exists():
        partial.unlink()
        partial.with_suffix(".json").unlink(missing_ok=True)
    return result


def latent_shape(bundle: ModelBundle) -> tuple[int, int, int, int]:
    """(1, C, h, w) of this model's latent for one image at the run's size: what z_T must be."""
    side = bundle.image_size // bundle.vae_scale
    return (1, int(bundle.unet.config.in_channels), side, side)


def _load_trained_mappers(mappers: MappingNetworks, tensors: dict, trained: int, path: Path) -> None:
    """Load M_0..M_{trained-1} from a (partial) checkpoint; any missing or misshapen tensor is a UserError."""
    stored = {k[len("mappers."):]: v for k, v in tensors.items() if k.startswith("mappers.")}
    wanted = [k for k in mappers.state_dict() if int(k.split(".")[1]) < trained]
    missing = [k for k in wanted if k not in stored]
    if missing:
        raise UserError(f"checkpoint '{path}' is damaged: it lacks the tensor 'mappers.{missing[0]}'.")
    try:
        mappers.load_state_dict({k: stored[k] for k in wanted}, strict=False)
    except RuntimeError as err:
        raise UserError(f"checkpoint '{path}' is damaged: its tensors do not match its metadata "
                        f"({' '.join(str(err).split())[:300]}).") from err


def load_inversion(bundle: ModelBundle, checkpoint: Path, image: torch.Tensor, prompt: str, num_steps: int,
                   settings: dict | None = None, options: dict | None = None) -> Inversion:
    """Load a finished StyleDiffusion inversion file, refusing one made by another method or for another
    image, prompt, model or T, or (given ``settings``: ``{"variant": ..., "train_config":
    TrainConfig.to_dict()}``) other training settings."""
    tensors, meta = read_inversion(checkpoint)
    expected = {**identity(bundle, image, prompt, num_steps), "method": "stylediffusion", **(settings or {})}
    check_identity(meta, expected, checkpoint)
    validate_inversion(tensors, meta, checkpoint, num_steps, latent_shape(bundle))
    if meta["trained_steps"] != num_steps:
        raise UserError(f"checkpoint '{checkpoint}' is incomplete ({meta.get('trained_steps')}/{num_steps} steps); "
                        f"finish it with --is_train True.")
    mappers = MappingNetworks(MappingConfig(**meta["mapping_config"]), num_steps)
    _load_trained_mappers(mappers, tensors, num_steps, checkpoint)
    z_T = tensors["z_T"]
    # z0 and E(x) from the image, as in the run that trained it (the file's copies are for Inversion.load)
    return Inversion("stylediffusion", encode_latent(bundle, image), z_T.to(bundle.device),
                     mappers=mappers.to(bundle.device).eval(), image_features=clip_image_features(bundle, image),
                     metadata=method_record(meta)).record_origin(bundle, image, prompt, num_steps, options)

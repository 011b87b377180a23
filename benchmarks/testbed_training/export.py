"""The ``export`` stage: a run's checkpoints as a diffusers folder (vae, text_encoder, tokenizer, unet,
scheduler, image_encoder, model_index.json, testbed.json) that ``load_models`` reads like real SD."""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Optional

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextModel

from stylediffusion.testbed import model as M
from stylediffusion.testbed import world as W

from .components import file_sha256, hashes_differ, load_trained_text_encoder, load_trained_vae, vae_encoder_sha256
from .stage_files import atomic_json, load_training_stage

STARTING_FOLDER_PARTS = ("text_encoder", "vae", "image_encoder", "tokenizer", "scheduler", "unet")


def export(out: str, model_dir: str, init_from: Optional[str] = None) -> None:
    """Export the run in ``out`` to ``model_dir``: from its clip, vae(, vae_decoder) and unet stages, or,
    for a run started from an exported folder (``init_from``, else the one its checkpoints name), with
    :func:`export_from_init`."""
    os.makedirs(model_dir, exist_ok=True)
    init_from = init_from or starting_folder_of(out)
    if init_from:
        return export_from_init(out, model_dir, init_from)
    clip_mods, clip_meta = load_trained_text_encoder(out)
    vae, vae_meta = load_trained_vae(out)
    dec_meta = None
    if os.path.exists(os.path.join(out, "vae_decoder.json")):
        with open(os.path.join(out, "vae_decoder.json")) as f:
            dec_meta = json.load(f)
    unet = M.build_unet()
    unet_meta = load_training_stage(out, "unet", {"unet": unet}, restore_rng=False)
    if unet_meta is None:
        print("[warn] no unet checkpoint: exporting an untrained unet", file=sys.stderr)
    save_components(model_dir, vae, clip_mods["text"], clip_mods["vision"], unet)
    info = {
        "description": "StyleDiffusion test bed: tiny SD-shaped model trained on the synthetic "
                       "shapes world (stylediffusion.testbed.world); see docs/testbed.md",
        "world": world_description(),
        "training": {"clip": stage_summary(clip_meta), "vae": stage_summary(vae_meta),
                     "vae_decoder_finetune": stage_summary(dec_meta), "unet": stage_summary(unet_meta),
                     "hardware": "2-core CPU (shared), torch %s" % torch.__version__},
    }
    _write_model_info(out, model_dir, info)


def starting_folder_of(out: str) -> Optional[str]:
    """The exported folder a run's unet or vae_decoder stage started from (``--init-from``), if any."""
    init_from = None
    for stage in ("unet", "vae_decoder"):
        path = os.path.join(out, f"{stage}.json")
        if os.path.exists(path):
            with open(path) as f:
                init_from = init_from or json.load(f).get("extra", {}).get("init_from")
    return init_from


def save_components(model_dir: str, vae, text_encoder, vision_encoder, unet) -> None:
    """The diffusers folder's components, tokenizer, scheduler and model_index.json."""
    vae.save_pretrained(os.path.join(model_dir, "vae"))
    text_encoder.save_pretrained(os.path.join(model_dir, "text_encoder"))
    vision_encoder.save_pretrained(os.path.join(model_dir, "image_encoder"))
    M.build_tokenizer().save_pretrained(os.path.join(model_dir, "tokenizer"))
    # the slow-tokenizer files too, for transformers versions that want them
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(M.TOKENIZER_DIR, name), os.path.join(model_dir, "tokenizer", name))
    unet.save_pretrained(os.path.join(model_dir, "unet"))
    M.build_scheduler().save_pretrained(os.path.join(model_dir, "scheduler"))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "image_encoder": ["transformers", "CLIPVisionModel"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    atomic_json(os.path.join(model_dir, "model_index.json"), index)


def world_description() -> dict:
    """testbed.json's description of the world the model was trained on."""
    return {
        "image_size": M.IMAGE_SIZE,
        "latent_size": M.LATENT_SIZE,
        "colours": W.OBJECT_COLOURS,
        "shapes": list(W.SHAPES),
        "sizes": {str(k): v for k, v in W.SIZES.items()},
        "backgrounds": {k: list(v) for k, v in W.BACKGROUNDS.items()},
        "heldout_combos": [list(c) for c in W.HELDOUT_COMBO_LIST],
        "caption_examples": ["a red circle on a striped gray background",
                             "a small green square and a yellow star on a blue background"],
    }


def stage_summary(meta: Optional[dict]) -> Optional[dict]:
    """testbed.json's record of one stage: steps, batch, wall time, mean of the last 50 losses, settings."""
    if not meta:
        return None
    losses = meta.get("losses", [])
    tail = losses[-50:]
    return dict(steps=meta["step"], batch=meta.get("batch"), seconds=round(meta["seconds"], 1),
                final_loss=float(np.mean(tail)) if tail else None, extra=meta.get("extra", {}))


def _write_model_info(out: str, model_dir: str, info: dict) -> None:
    """testbed.json of an exported model, with the run's evaluation when there is one."""
    ev = os.path.join(out, "eval.json")
    if os.path.exists(ev):
        with open(ev) as f:
            info["evaluation"] = json.load(f)
    atomic_json(os.path.join(model_dir, "testbed.json"), info)
    print(f"exported to {model_dir}", file=sys.stderr)


def _drop_local_path(cfg_path: str) -> None:
    """from_pretrained records where a component was read from; a shipped config names no local path."""
    if not os.path.exists(cfg_path):
        return
    with open(cfg_path) as f:
        cfg = json.load(f)
    if "_name_or_path" in cfg:
        cfg.pop("_name_or_path")
        atomic_json(cfg_path, cfg)


def export_from_init(out: str, model_dir: str, init_from: str) -> None:
    """Export what a run started from an exported folder trained: the UNet and/or the VAE decoder
    come from ``out`` (``unet``, ``vae_decoder`` checkpoints), every other component (text and image
    encoders, VAE encoder, tokenizer, scheduler) is copied unchanged from ``init_from``.  The text
    encoder and the VAE encoder must be the ones the run trained against (hash-checked)."""
    unet = M.build_unet()
    meta = load_training_stage(out, "unet", {"unet": unet}, restore_rng=False)
    vae = AutoencoderKL.from_pretrained(os.path.join(init_from, "vae"), use_safetensors=True)
    start_hashes = {"text_encoder": file_sha256(os.path.join(init_from, "text_encoder/model.safetensors")),
                    "vae_encoder": vae_encoder_sha256(vae)}
    dec_meta = load_training_stage(out, "vae_decoder", {"vae": vae}, restore_rng=False)
    check_trained_against(out, init_from, meta, dec_meta, start_hashes)
    if os.path.abspath(init_from) != os.path.abspath(model_dir):
        copy_starting_folder(init_from, model_dir)
    if meta is not None:
        unet.save_pretrained(os.path.join(model_dir, "unet"))
        if meta["extra"].get("text_layers") is not None:
            te = CLIPTextModel.from_pretrained(os.path.join(init_from, "text_encoder"), use_safetensors=True)
            te = M.truncate_text_encoder(te, meta["extra"]["text_layers"])
            te.save_pretrained(os.path.join(model_dir, "text_encoder"))
    if dec_meta is not None:
        vae.save_pretrained(os.path.join(model_dir, "vae"))
        _drop_local_path(os.path.join(model_dir, "vae", "config.json"))
    _write_model_info(out, model_dir, model_info_after_run(init_from, meta, dec_meta))


def check_trained_against(out: str, init_from: str, meta: Optional[dict], dec_meta: Optional[dict],
                          start_hashes: dict) -> None:
    """Refuse (SystemExit) a run with nothing to export, or one trained against another text encoder or
    VAE encoder than ``init_from``'s."""
    if meta is None and dec_meta is None:
        raise SystemExit(f"error: no unet or vae_decoder checkpoint in {out}")
    if meta is not None and hashes_differ(meta["extra"].get("init_hashes"), start_hashes):
        raise SystemExit(f"error: the text encoder or VAE encoder in {init_from} is not the one the UNet "
                         f"in {out} was trained with")
    if dec_meta is not None and dec_meta["extra"].get("encoder_sha256") not in (None, start_hashes["vae_encoder"]):
        raise SystemExit(f"error: the VAE encoder in {init_from} is not the one the decoder in {out} was "
                         f"trained with")


def copy_starting_folder(init_from: str, model_dir: str) -> None:
    """Every component and model_index.json of ``init_from`` into ``model_dir``, naming no local path."""
    os.makedirs(model_dir, exist_ok=True)
    for sub in STARTING_FOLDER_PARTS:
        dst = os.path.join(model_dir, sub)
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        shutil.copytree(os.path.join(init_from, sub), dst)
        _drop_local_path(os.path.join(dst, "config.json"))
    shutil.copyfile(os.path.join(init_from, "model_index.json"), os.path.join(model_dir, "model_index.json"))


def model_info_after_run(init_from: str, meta: Optional[dict], dec_meta: Optional[dict]) -> dict:
    """The starting folder's testbed.json with the run's unet and decoder fine-tune recorded (its
    evaluation dropped: the starting model's numbers do not describe this one)."""
    info_path = os.path.join(init_from, "testbed.json")
    info = {}
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
    info.pop("evaluation", None)
    training = info.setdefault("training", {})
    if meta is not None:
        losses, attn = meta.get("losses", []), meta.get("attn_losses", [])
        if training.get("unet") and "unet_start" not in training:
            training["unet_start"] = training["unet"]  # what the starting UNet had been trained with
        training["unet"] = dict(
            steps=meta["step"], batch=meta.get("batch"), seconds=round(meta["seconds"], 1),
            final_loss=float(np.mean(losses[-50:])) if losses else None,
            final_attn_loss=float(np.mean(attn[-50:])) if attn else None,
            init_from="the previous test-bed model (same text encoder and VAE encoder)", extra={
                k: v for k, v in meta["extra"].items() if k not in ("init_from", "init_hashes")})
    if dec_meta is not None:
        losses = dec_meta.get("losses", [])
        training.setdefault("vae_decoder_finetunes", []).append(dict(
            steps=dec_meta["step"], batch=dec_meta.get("batch"), seconds=round(dec_meta["seconds"], 1),
            final_loss=float(np.mean(losses[-50:])) if losses else None,
            object_weight=dec_meta["extra"].get("object_weight"),
            texture_phase=dec_meta["extra"].get("texture_phase", "fixed")))
    return info

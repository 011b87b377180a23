"""Model folders laid out as users download them (tests/layouts.py), loaded the way users load them.

Every test here goes through files on disk; the workflow tests run training and editing in separate
processes, as the authors' README does, so a model identity that changes between processes, or a
file the second process cannot read, fails here.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import layouts
import pytest
import torch

from stylediffusion.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(ROOT)}
# hub file -> (prediction type, number of keys in the hub's unet/config.json, text width reduced, UNet sample size)
EXPECTED = {
    "sd-v1-4": ("epsilon", 19, 32, 16),
    "sd-v1-5": ("epsilon", 19, 32, 16),
    "sd-2-1-base": ("epsilon", 24, 48, 16),
    "sd-2-1": ("v_prediction", 24, 48, 24),
}


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """Every SD layout (plain safetensors, one seed each so their weights differ) and the image encoder."""
    root = tmp_path_factory.mktemp("layouts")
    built = {name: layouts.build_folder(name, root / name, seed=k) for k, name in enumerate(layouts.SD_LAYOUTS)}
    built["image_encoder"] = layouts.build_image_encoder(root / "clip-vit-base-patch16")
    return built


def load(folder, image_encoder, **kw):
    from stylediffusion.models import load_models

    return load_models(str(folder), str(image_encoder), **kw)


def test_fixtures_are_the_hub_files():
    """The committed configs keep the hub's keys: what the loader meets on a user's machine."""
    for name, (prediction, unet_keys, _, _) in EXPECTED.items():
        unet = layouts.hub_config(name, "unet", "config.json")
        assert len(unet) == unet_keys, name
        assert unet["sample_size"] == (96 if name == "sd-2-1" else 64)
        scheduler = layouts.hub_config(name, "scheduler", "scheduler_config.json")
        assert scheduler.get("prediction_type", "epsilon") == prediction
        assert set(layouts.hub_config(name, "model_index.json")) >= {"unet", "vae", "text_encoder", "tokenizer",
                                                                     "scheduler"}
    assert layouts.hub_config("sd-v1-4", "scheduler", "scheduler_config.json")["_class_name"] == "PNDMScheduler"
    assert {"safety_checker", "feature_extractor"} <= set(layouts.hub_config("sd-v1-4", "model_index.json"))
    vision = layouts.hub_config("clip-vit-base-patch16", "config.json")["vision_config"]
    assert (vision["patch_size"], vision["image_size"], vision["hidden_size"]) == (16, 224, 768)


@pytest.mark.parametrize("name", layouts.SD_LAYOUTS)
def test_folder_loads_with_its_layers_features_schedule_and_prompts(folders, name):
    from ptp_utils import BatchLayout, CrossAttentionRecorder, controlled, install_attention_control
    from stylediffusion.ddim import make_ddim_scheduler
    from stylediffusion.encoders import clip_image_features, encode_prompts

    prediction, _, width, sample = EXPECTED[name]
    b = load(folders[name], folders["image_encoder"])
    saved = json.loads((folders[name] / "unet" / "config.json").read_text())
    assert len(saved) == EXPECTED[name][1]  # the file on disk is still the hub's key set
    assert b.unet.config.sample_size == sample and b.image_size == sample * 8

    # the scheduler becomes the paper's DDIM with the model's own betas and prediction type
    hub = layouts.hub_config(name, "scheduler", "scheduler_config.json")
    cfg = b.scheduler.config
    assert type(b.scheduler).__name__ == "DDIMScheduler"
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (hub["beta_start"], hub["beta_end"],
                                                                 hub["beta_schedule"])
    assert cfg.prediction_type == prediction and cfg.clip_sample is False and cfg.set_alpha_to_one is False
    assert cfg.steps_offset == make_ddim_scheduler({}).config.steps_offset

    # image features: every token of ViT-B/16 at 224 px (196 patches + CLS), the vision width
    image = torch.rand(1, 3, b.image_size, b.image_size) * 2 - 1
    assert clip_image_features(b, image).shape == (1, 197, 32)

    # mid-low layers: the cross-attention layers at latent/4, 2 down + 3 up in SD's block layout
    state = install_attention_control(b.unet)
    recorder = CrossAttentionRecorder()
    side = b.unet.config.sample_size
    text = encode_prompts(b, ["a photo of a cat"])
    with controlled(state, recorder):
        state.set(step=0, layout=BatchLayout.single(), latent_hw=(side, side), num_steps=1)
        b.unet(torch.randn(1, 4, side, side), 500, encoder_hidden_states=text)
    maps = recorder.maps[0]  # step 0: the mid-low maps, one per layer
    assert len(maps) == 5
    assert all(m.shape[-2:] == ((side // 4) ** 2, 77) for m in maps)

    # prompts: padded to the tokenizer's 77 tokens at the text width; a prompt past 77 tokens is refused
    assert text.shape == (1, 77, width)
    with pytest.raises(UserError, match="77"):
        encode_prompts(b, ["a photo of a cat " * 30])


def test_dtype_handling_and_identity_across_dtypes(folders):
    f32 = load(folders["sd-v1-4"], folders["image_encoder"])
    bf16 = load(folders["sd-v1-4"], folders["image_encoder"], dtype=torch.bfloat16)
    assert bf16.unet.dtype == torch.bfloat16 and bf16.text_encoder.dtype == torch.bfloat16
    assert bf16.vae.dtype == torch.float32  # fp16/bf16 SD VAEs overflow: it stays float32
    assert bf16.fingerprint == f32.fingerprint  # one model, whatever dtype it runs in


@pytest.mark.parametrize("weights", ["fp16_only", "both"])
def test_fp16_variant_folders_load_and_are_the_same_model(folders, weights, tmp_path):
    plain = load(folders["sd-v1-4"], folders["image_encoder"])
    folder = layouts.build_folder("sd-v1-4", tmp_path / "sd", weights=weights, seed=0)
    assert any(p.name.endswith(".fp16.safetensors") for p in (folder / "unet").iterdir())
    for dtype in (torch.float32, torch.float16):
        b = load(folder, folders["image_encoder"], dtype=dtype)
        assert b.unet.dtype == dtype
        assert b.fingerprint == plain.fingerprint


def test_pickled_weights_are_refused_with_one_line(folders, tmp_path):
    folder = layouts.build_folder("sd-v1-4", tmp_path / "sd", weights="bin")
    assert not list(folder.rglob("*.safetensors"))
    with pytest.raises(UserError, match="never loads pickles") as err:
        load(folder, folders["image_encoder"])
    assert "\n" not in str(err.value)
    pickled_encoder = layouts.build_image_encoder(tmp_path / "clip", weights="bin")
    with pytest.raises(UserError, match="never loads pickles"):
        load(folders["sd-v1-4"], pickled_encoder)


def test_single_file_checkpoint_is_refused_with_what_to_do(folders, tmp_path):
    single = tmp_path / "v1-5-pruned-emaonly.safetensors"
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(single))
    with pytest.raises(UserError, match="from_single_file"):
        load(single, folders["image_encoder"])


def test_fingerprint_ignores_private_keys_paths_and_processes(folders, tmp_path):
    """The same files give the same identity in other processes and from another folder; other weights
    or another public config value give another."""
    code = ("import sys; from stylediffusion.models import load_models; "
            "print(load_models(sys.argv[1], sys.argv[2]).fingerprint)")
    args = [str(folders["sd-v1-4"]), str(folders["image_encoder"])]
    prints = {subprocess.run([sys.executable, "-c", code, *args], env=ENV, capture_output=True, text=True,
                             check=True).stdout.strip() for _ in range(3)}
    here = load(folders["sd-v1-4"], folders["image_encoder"])
    assert prints == {here.fingerprint}

    import shutil

    moved = shutil.copytree(folders["sd-v1-4"], tmp_path / "elsewhere")
    cfg_path = moved / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "_diffusers_version": "0.99.0", "_use_default_values": ["b", "a"]}))
    assert load(moved, folders["image_encoder"]).fingerprint == here.fingerprint
    # spelling out a default value is the same model
    cfg_path.write_text(json.dumps({**cfg, "dual_cross_attention": False}))
    assert load(moved, folders["image_encoder"]).fingerprint == here.fingerprint
    # other weights, another schedule: another model
    assert load(folders["sd-v1-5"], folders["image_encoder"]).fingerprint != here.fingerprint
    sched = moved / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": "v_prediction"}))
    assert load(moved, folders["image_encoder"]).fingerprint != here.fingerprint


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "edit_w_ptp_v_clip.py"), *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name", [*layouts.SD_LAYOUTS, "tiny"])
def test_authors_two_step_workflow_across_processes(folders, name, tmp_path):
    """``--is_train True --idx 2`` then ``--is_train False --idx 2 --edit_type Replacement`` in a new process:
    the second process edits with what the first trained, without training again."""
    model = ["--model", "tiny"] if name == "tiny" else ["--model", str(folders[name]),
                                                         "--image_encoder", str(folders["image_encoder"])]
    common = [*model, "--idx", "2", "--num_ddim_steps", "2", "--num_inner_steps", "1", "--device", "cpu",
              "--progress", "False"]
    train = run_cli("--is_train", "True", *common, cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    ckpts = sorted((tmp_path / "checkpoints").glob("*.safetensors"))
    assert len(ckpts) == 1 and "_T2_K1" in ckpts[0].name
    before = ckpts[0].stat().st_mtime_ns

    edit = run_cli("--is_train", "False", *common, "--edit_type", "Replacement", "--outdir", "out", cwd=tmp_path)
    assert edit.returncode == 0, edit.stderr
    assert "training it first" not in edit.stdout + edit.stderr
    assert ckpts[0].stat().st_mtime_ns == before
    report = json.loads((tmp_path / "out" / "edit.json").read_text())
    assert report["edit_type"] == "Replacement" and report["target"] == "a robot in a space suit"
    assert (tmp_path / "out" / "edited.png").is_file()

    if name == "tiny":  # K is part of what was trained: another K trains its own file, never reuses this one
        other = run_cli("--is_train", "True", *[a if a != "1" else "2" for a in common], cwd=tmp_path)
        assert other.returncode == 0, other.stderr
        assert len(list((tmp_path / "checkpoints").glob("*.safetensors"))) == 2


def test_hub_ids_read_from_the_cache_offline_across_processes(folders, tmp_path):
    """The paper's defaults (--model CompVis/stable-diffusion-v1-4, --image_encoder
    openai/clip-vit-base-patch16) from a Hugging Face cache, offline, as a user who downloaded once has
    them: trains, then edits in a new process, with nothing on stderr but what was asked for."""
    import shutil

    cache = tmp_path / "hub"
    sha = "0123456789abcdef0123456789abcdef01234567"
    for repo, folder in (("CompVis--stable-diffusion-v1-4", folders["sd-v1-4"]),
                         ("openai--clip-vit-base-patch16", folders["image_encoder"])):
        (cache / f"models--{repo}" / "refs").mkdir(parents=True)
        (cache / f"models--{repo}" / "refs" / "main").write_text(sha)
        shutil.copytree(folder, cache / f"models--{repo}" / "snapshots" / sha)
    env = {**ENV, "HF_HUB_CACHE": str(cache)}
    common = ["--idx", "2", "--num_ddim_steps", "2", "--num_inner_steps", "1", "--device", "cpu", "--progress", "False"]
    for extra in (["--is_train", "True"], ["--is_train", "False", "--outdir", "out"]):
        done = subprocess.run([sys.executable, str(ROOT / "edit_w_ptp_v_clip.py"), *common, *extra], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "training it first" not in done.stdout
    assert [p.name for p in (tmp_path / "checkpoints").glob("*.safetensors")] == [
        "case2_CompVis-stable-diffusion-v1-4_T2_K1.safetensors"]


def test_explicit_checkpoint_with_other_settings_is_refused(tmp_path, capsys):
    """A --checkpoint trained with other settings is refused with one line, never silently reused."""
    from stylediffusion.cli import main

    common = ["--model", "tiny", "--idx", "2", "--num_ddim_steps", "2", "--num_inner_steps", "1", "--device", "cpu",
              "--progress", "False", "--checkpoint", str(tmp_path / "inv.safetensors"), "--outdir", str(tmp_path / "o")]
    assert main(["--is_train", "True", *common]) == 0
    capsys.readouterr()
    for extra, needle in ((["--lr", "0.05"], "training settings (lr: 0.01 vs 0.05)"),
                          (["--variant", "replace"], "variant"),
                          (["--attention_loss", "False"], "training settings (attention_loss: True vs False)"),
                          (["--num_inner_steps", "3"], "training settings (num_inner_steps: 1 vs 3)")):
        assert main(["--is_train", "False", *common, *extra]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_pie_runner_resumes_in_a_new_process_on_a_real_layout(folders, tmp_path):
    """``bench pie`` stopped after one entry, then run again in a new process: it keeps the first row and
    its checkpoint and does only the second entry."""
    import csv

    import numpy as np
    from PIL import Image

    images = tmp_path / "annotation_images"
    mapping = {}
    for n, key in enumerate(("000000000001", "000000000002")):
        rel = f"0_random_140/{key}.jpg"
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((64, 64, 3), 60 + 80 * n, np.uint8)).save(images / rel)
        mapping[key] = {"image_path": rel, "original_prompt": "a cat sitting on the grass",
                        "editing_prompt": "a [dog] sitting on the grass", "editing_instruction": "make it a dog",
                        "editing_type_id": "0", "blended_word": "cat dog", "mask": [0, 512 * 64]}
    (tmp_path / "mapping_file.json").write_text(json.dumps(mapping))
    args = [sys.executable, "-m", "stylediffusion.bench", "pie", "--mapping_file", str(tmp_path / "mapping_file.json"),
            "--images", str(images), "--outdir", str(tmp_path / "run"), "--model", str(folders["sd-v1-4"]),
            "--image_encoder", str(folders["image_encoder"]), "--num_ddim_steps", "2", "--num_inner_steps", "1",
            "--device", "cpu", "--clip_model", "none", "--dino_model", "none", "--lpips", "False",
            "--checkpoint_dir", str(tmp_path / "ckpts")]
    first = subprocess.run([*args, "--limit", "1"], env=ENV, capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    ckpts = sorted((tmp_path / "ckpts").glob("*.safetensors"))
    assert [p.name for p in ckpts] == ["000000000001_sd-v1-4_T2_K1.safetensors"]
    stamp = ckpts[0].stat().st_mtime_ns
    second = subprocess.run(args, env=ENV, capture_output=True, text=True, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert ckpts[0].stat().st_mtime_ns == stamp  # the finished entry is not redone
    assert len(list((tmp_path / "ckpts").glob("*.safetensors"))) == 2
    rows = list(csv.DictReader(open(next((tmp_path / "run").rglob("*.csv")), newline="")))
    assert sorted(r["id"] for r in rows) == ["000000000001", "000000000002"]

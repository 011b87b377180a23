"""StyleDiffusion training: schedule, frozen weights, reconstruction quality, checkpoints and resume."""
import logging

import pytest
import torch

from stylediffusion.checkpoint import read_checkpoint
from stylediffusion.ddim import DDIMSchedule
from stylediffusion.editing import EditSpec, run_edit
from stylediffusion.encoders import clip_image_features, encode_latent, encode_prompts
from stylediffusion.errors import UserError
from stylediffusion.inversion import load_inversion, train_inversion
from stylediffusion.mapping import MappingConfig, MappingNetwork
from stylediffusion.sampling import guided_sampling
from stylediffusion.training import TrainConfig, early_stop_threshold, inner_steps, step_lr

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def image():
    g = torch.Generator().manual_seed(3)
    # smooth structure plus texture, like a photograph rather than white noise
    base = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=64, mode="bicubic")
    return (base * 2 - 1 + 0.1 * torch.randn(1, 3, 64, 64, generator=g)).clamp(-1, 1)


def test_schedule_constants():
    assert sum(inner_steps(100, i) for i in range(30)) == 1015
    assert inner_steps(100, 0) == 100 and inner_steps(20, 29) == 2
    assert step_lr(1e-2, 50) == pytest.approx(5e-3)
    assert early_stop_threshold(10) == pytest.approx(2.1e-4)


def test_mapping_network_size_matches_released_code():
    net = MappingNetwork(MappingConfig(image_tokens=197, image_width=768, text_tokens=77, text_width=768))
    assert sum(p.numel() for p in net.parameters()) == 78_540
    # SD 2.x text width 1024 differs from ViT-B/16's 768: a learned bridge appears
    wide = MappingNetwork(MappingConfig(197, 768, 77, 1024))
    out = wide(torch.randn(1, 197, 768), torch.randn(2, 77, 1024))
    assert out.shape == (2, 77, 1024)


@pytest.fixture(scope="module")
def trained(tiny, image, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt") / "inv.safetensors"
    torch.manual_seed(0)
    inv = train_inversion(tiny, image, PROMPT, 10, TrainConfig(num_inner_steps=20), ckpt, progress=False)
    return inv, ckpt


def test_only_mapping_networks_are_trained(tiny, trained):
    for module in (tiny.unet, tiny.vae, tiny.text_encoder, tiny.image_encoder):
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    inv, _ = trained
    assert all(not p.requires_grad for p in inv.mappers.parameters())
    assert inv.metadata["inner_iterations"] <= sum(inner_steps(20, i) for i in range(10))


def test_trained_inversion_reconstructs_far_better_than_ddim(tiny, image, trained):
    inv, _ = trained
    schedule = DDIMSchedule(tiny.scheduler, 10)
    z0 = encode_latent(tiny, image)
    feats = clip_image_features(tiny, image)
    spec = EditSpec(PROMPT, PROMPT, tau_v=1.0, tau_c=1.0, tau_s=1.0)
    recon = run_edit(tiny, schedule, inv.z_T, spec, inv.mappers, feats, progress=False).latents[0]
    plain = guided_sampling(tiny, schedule, inv.z_T, encode_prompts(tiny, [PROMPT]), encode_prompts(tiny, [""]), 7.5)
    mse_sd = torch.mean((recon - z0) ** 2).item()
    mse_ddim = torch.mean((plain[0] - z0) ** 2).item()
    print(
        f"reconstruction MSE: StyleDiffusion {mse_sd:.4g}, DDIM at w=7.5 {mse_ddim:.4g}, ratio {mse_ddim / mse_sd:.1f}x"
    )
    assert mse_ddim / mse_sd >= 10


def test_reloaded_checkpoint_gives_bit_identical_edit_and_identity_edit(tiny, image, trained):
    inv, ckpt = trained
    schedule = DDIMSchedule(tiny.scheduler, 10)
    feats = clip_image_features(tiny, image)
    spec = EditSpec(PROMPT, "a photo of a dog", blend_words=("cat", "dog"))
    first = run_edit(tiny, schedule, inv.z_T, spec, inv.mappers, feats, progress=False).latents
    loaded = load_inversion(tiny, ckpt, image, PROMPT, 10)
    second = run_edit(tiny, schedule, loaded.z_T, spec, loaded.mappers, feats, progress=False).latents
    assert torch.equal(first, second)
    same = EditSpec(PROMPT, PROMPT, tau_v=1.0, tau_c=1.0, tau_s=1.0)
    out = run_edit(tiny, schedule, loaded.z_T, same, loaded.mappers, feats, progress=False).latents
    assert torch.equal(out[0], out[1])
    _, meta = read_checkpoint(ckpt)
    assert meta["prompt"] == PROMPT and meta["num_ddim_steps"] == 10 and meta["variant"] == "modulate"
    assert ckpt.with_suffix(".json").is_file()


def test_checkpoint_refuses_other_image_prompt_or_T(tiny, image, trained):
    _, ckpt = trained
    with pytest.raises(UserError, match="different source prompt"):
        load_inversion(tiny, ckpt, image, "a photo of a dog", 10)
    with pytest.raises(UserError, match="different image"):
        load_inversion(tiny, ckpt, -image, PROMPT, 10)
    with pytest.raises(UserError, match="number of DDIM steps"):
        load_inversion(tiny, ckpt, image, PROMPT, 12)


def test_corrupt_checkpoint_is_a_clear_error(tiny, image, trained, tmp_path):
    _, ckpt = trained
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(ckpt.read_bytes()[: 300])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_inversion(tiny, bad, image, PROMPT, 10)


def test_interrupted_training_resumes_to_the_same_result(tiny, image, tmp_path, monkeypatch, caplog):
    import stylediffusion.results as results_module  # Inversion.save writes every inversion file

    cfg = TrainConfig(num_inner_steps=3)
    torch.manual_seed(0)
    full = train_inversion(tiny, image, PROMPT, 6, cfg, tmp_path / "full.safetensors", progress=False)

    real_save = results_module.save_checkpoint
    calls = {"n": 0}

    def crash_after_three(path, tensors, meta):
        real_save(path, tensors, meta)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    target = tmp_path / "resumed.safetensors"
    monkeypatch.setattr(results_module, "save_checkpoint", crash_after_three)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        train_inversion(tiny, image, PROMPT, 6, cfg, target, progress=False)
    assert not target.exists()  # no final file from an interrupted run
    monkeypatch.setattr(results_module, "save_checkpoint", real_save)
    torch.manual_seed(123)  # a different RNG state must not matter: M_3 warm-starts from M_2
    with caplog.at_level(logging.INFO, logger="stylediffusion.inversion"):
        resumed = train_inversion(tiny, image, PROMPT, 6, cfg, target, progress=False)
    assert any("resuming" in line and "3/6" in line for line in caplog.messages)
    for a, b in zip(full.mappers.state_dict().values(), resumed.mappers.state_dict().values()):
        assert torch.equal(a, b)
    assert not target.with_name("resumed.partial.safetensors").exists()



def test_float16_training_scales_the_loss_so_gradients_do_not_underflow(image):
    """At SD v1's latent size an unscaled float16 backward flushes M_i's gradient to zero."""
    from benchmarks.half_precision_gradients import mapper_gradient
    from stylediffusion.models import load_models
    from stylediffusion.training import gradient_scaler

    half = load_models("tiny", dtype=torch.float16)
    assert gradient_scaler(half).is_enabled()
    assert not gradient_scaler(load_models("tiny", dtype=torch.bfloat16)).is_enabled()
    prompt = "a photo of a cat"
    reference = mapper_gradient(load_models("tiny"), image, prompt, 1e-3)
    unscaled = mapper_gradient(half, image, prompt, 1e-3)
    scaled = mapper_gradient(half, image, prompt, 1e-3, scaled=True)
    assert (unscaled == 0).float().mean() > 0.5
    assert torch.nn.functional.cosine_similarity(scaled, reference, dim=0) > 0.99

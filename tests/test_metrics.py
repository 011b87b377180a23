"""Metrics: pixel metrics against hand-computed values, backbone metrics' mechanics on tiny
random-weight models (no network, no weights), and the "unavailable, never a number" contract."""
import math
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from stylediffusion import metrics as M
from stylediffusion.errors import UserError

TOK_DIR = Path(__file__).resolve().parents[1] / "stylediffusion" / "assets" / "clip_tokenizer"


def const(v, h=16, w=16):
    return torch.full((1, 3, h, w), float(v))


def rand(seed, h=16, w=16):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- conversion
def test_to_image_tensor_from_pil_and_uint8():
    arr = np.zeros((4, 5, 3), np.uint8)
    arr[..., 0] = 255
    for src in (arr, Image.fromarray(arr)):
        t = M.to_image_tensor(src)
        assert t.shape == (1, 3, 4, 5) and t.dtype == torch.float32
        assert t[0, 0].eq(1).all() and t[0, 1:].eq(0).all()


def test_mask_0_255_png_counts_as_ones_and_is_resized():
    m = M.to_mask_tensor(Image.fromarray(np.full((8, 8), 255, np.uint8)), const(0, 16, 16))
    assert m.shape == (1, 1, 16, 16) and m.eq(1).all()


# ----------------------------------------------------------------------------- pixel metrics
def test_constant_images_differing_by_0p1():
    a, b = const(0.5), const(0.6)
    assert M.mse(a, b) == pytest.approx(0.01, rel=1e-5)
    assert M.psnr(a, b) == pytest.approx(20.0, abs=1e-3)


def test_masked_metrics_follow_pie_bench_multiply_convention():
    """Mask = left half. Both images are zeroed outside, so the right half counts as a perfect match:
    MSE = 0.01 * 1/2 over the whole image (not 0.01 over the masked pixels)."""
    a, b = const(0.5), const(0.6)
    mask = torch.zeros(16, 16)
    mask[:, :8] = 1
    assert M.mse(a, b, mask) == pytest.approx(0.005, rel=1e-5)
    assert M.psnr(a, b, mask) == pytest.approx(10 * math.log10(1 / 0.005), abs=1e-3)
    # a bool (H,W) mask and a (N,1,H,W) float mask are the same thing
    assert M.mse(a, b, mask.bool()) == pytest.approx(M.mse(a, b, mask[None, None]))
    # differences outside the mask are ignored entirely
    c = b.clone()
    c[..., 8:] = 0.0
    assert M.mse(a, c, mask) == pytest.approx(0.005, rel=1e-5)


def test_psnr_of_identical_images_is_inf_and_batch_is_mean_of_per_image():
    a = rand(0)
    assert math.isinf(M.psnr(a, a))
    a2, b2 = torch.cat([const(0.5), const(0.5)]), torch.cat([const(0.6), const(0.7)])
    assert M.psnr(a2, b2) == pytest.approx((20.0 + 10 * math.log10(1 / 0.04)) / 2, abs=1e-3)


def _ssim_reference(x, y, k=11, sigma=1.5):
    """Direct numpy SSIM as torchmetrics defines it: 11x11 Gaussian window over the image reflect-padded
    by 5 (so every pixel has a window), variances clamped at 0, C1=(0.01)^2, C2=(0.03)^2, mean map."""
    g = np.exp(-((np.arange(k) - (k - 1) / 2) ** 2) / (2 * sigma**2))
    g /= g.sum()
    win = np.outer(g, g)

    def filt(img):  # (C,H,W) -> (C,H-k+1,W-k+1)
        v = np.lib.stride_tricks.sliding_window_view(img, (k, k), axis=(1, 2))
        return (v * win).sum(axis=(-1, -2))

    p = (k - 1) // 2
    x, y = (np.pad(z, ((0, 0), (p, p), (p, p)), mode="reflect") for z in (x, y))
    mx, my = filt(x), filt(y)
    sxx, syy = np.maximum(filt(x * x) - mx**2, 0), np.maximum(filt(y * y) - my**2, 0)
    sxy = filt(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.mean()


def test_ssim_identical_is_one_and_matches_numpy_reference():
    a, b = rand(1, 20, 20), rand(2, 20, 20)
    assert M.ssim(a, a) == pytest.approx(1.0, abs=1e-6)
    ref = _ssim_reference(a[0].double().numpy(), b[0].double().numpy())
    assert M.ssim(a, b) == pytest.approx(ref, abs=1e-4)


def test_ssim_decreases_with_noise():
    a = rand(3, 24, 24)
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(4))
    vals = [M.ssim(a, (a + s * noise).clamp(0, 1)) for s in (0.01, 0.05, 0.2)]
    assert vals[0] > vals[1] > vals[2]


# ----------------------------------------------------------------------------- LPIPS
def test_lpips_and_ns_lpips_unavailable_without_torchvision():
    pytest.importorskip("torchmetrics")
    try:
        import torchvision  # noqa: F401
        pytest.skip("torchvision installed: LPIPS may be available")
    except ImportError:
        pass
    r = M.lpips(rand(0), rand(1))
    assert isinstance(r, M.MetricUnavailable)
    assert str(r).startswith("n/a (") and "torchvision" in str(r)
    assert isinstance(M.ns_lpips(rand(0), rand(1), torch.rand(4, 4)), M.MetricUnavailable)


# ----------------------------------------------------------------------------- CLIP score
CLIP_IMG = rand(5, 40, 48)  # non-square: exercises resize + centre crop
CLIP_MASK = torch.zeros(40, 48)
CLIP_MASK[10:30, 12:36] = 1


@pytest.fixture(scope="module")
def clip():
    """Tiny random CLIP. Random embeddings often have cosine < 0, which the score clamps to 0 and
    would make the comparisons below vacuous, so take the first seed where the scores are positive."""
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, vocab_size=49408),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    tok = transformers.CLIPTokenizer(str(TOK_DIR / "vocab.json"), str(TOK_DIR / "merges.txt"))
    for seed in range(5, 40):
        torch.manual_seed(seed)
        bb = M.ClipBackbone(transformers.CLIPModel(cfg).eval(), tok)
        if all(M.clip_score(CLIP_IMG, t, mask=m, model=bb) > 0
               for t in ("a photo of a cat", "a red car on a road") for m in (None, CLIP_MASK)):
            return bb
    pytest.fail("no seed gave positive CLIP scores")


def test_clip_score_mechanics(clip):
    img = CLIP_IMG
    s1 = M.clip_score(img, "a photo of a cat", model=clip)
    s2 = M.clip_score(img, "a photo of a cat", model=clip)
    assert s1 == s2 and 0.0 < s1 <= 100.0
    assert M.clip_score(img, "a photo of a cat", mask=CLIP_MASK, model=clip) != pytest.approx(s1, abs=1e-3)
    assert M.clip_score(img, "a red car on a road", model=clip) != pytest.approx(s1, abs=1e-3)
    # a bare model gets the bundled tokenizer, which is the same vocabulary
    assert M.clip_score(img, "a photo of a cat", model=clip.model) == s1


def test_clip_score_equals_clamped_100_cosine(clip):
    """Re-derive the score from the towers with a hand-made preprocessing of an already 32x32 image."""
    img = rand(6, 32, 32)
    x = (img - torch.tensor(M.CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(M.CLIP_STD).view(1, 3, 1, 1)
    ids = clip.tokenizer(["a photo of a cat"], return_tensors="pt")
    with torch.no_grad():
        ie = clip.model.visual_projection(clip.model.vision_model(pixel_values=x).pooler_output)
        te = clip.model.text_projection(clip.model.text_model(**ids).pooler_output)
    expected = 100 * torch.nn.functional.cosine_similarity(ie, te).item()
    assert expected > 0  # else the clamp would hide a wrong embedding
    assert M.clip_score(img, "a photo of a cat", model=clip) == pytest.approx(expected, abs=1e-3)


# ----------------------------------------------------------------------------- structure distance
@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, image_size=32, patch_size=8)
    return transformers.ViTModel(cfg, add_pooling_layer=False).eval()


def test_structure_distance(vit):
    a, b = rand(7, 64, 64), rand(8, 64, 64)
    assert M.structure_distance(a, a, model=vit) == pytest.approx(0.0, abs=1e-10)
    d = M.structure_distance(a, b, model=vit)
    assert d > 0
    assert M.structure_distance(b, a, model=vit) == pytest.approx(d, rel=1e-5)
    # the hook is removed after use
    assert not M._last_key_projection(vit)._forward_hooks


# ----------------------------------------------------------------------------- backbones / aggregate
def test_load_backbone_missing_offline_raises_one_line_user_error():
    with pytest.raises(UserError) as ei:
        M.load_backbone("clip", "nobody/no-such-clip-model-xyz")
    msg = str(ei.value)
    assert "\n" not in msg and "nobody/no-such-clip-model-xyz" in msg and "--clip_model" in msg
    with pytest.raises(UserError, match="--dino_model"):
        M.load_backbone("dino", "/no/such/folder")


def test_evaluate_pair_marks_missing_backbones_unavailable(clip, vit):
    src, edt = const(0.5), const(0.6)
    edit_mask = torch.zeros(16, 16)
    edit_mask[:, 8:] = 1
    r = M.evaluate_pair(src, edt, edit_mask=edit_mask, target_prompt="a cat",
                        backbones={"clip": "nobody/no-such-clip-model-xyz"})
    assert r["mse"] == pytest.approx(0.005, rel=1e-5)  # background = 1 - edit mask
    for k in ("clip_whole", "clip_edited", "structure_distance", "lpips", "ns_lpips"):
        assert isinstance(r[k], M.MetricUnavailable), k
    assert "--clip_model" in r["clip_whole"].reason
    r2 = M.evaluate_pair(src, edt, edit_mask=edit_mask, target_prompt="a cat", backbones={"clip": clip, "dino": vit})
    assert all(isinstance(r2[k], float) for k in ("clip_whole", "clip_edited", "structure_distance", "psnr", "ssim"))


# ----------------------------------------------------------------------------- PIE-Bench's structure-distance input
def test_pie_resize_shape_is_torchvision_resize_224_max_480():
    assert M.pie_resize_shape(512, 512) == (224, 224)
    assert M.pie_resize_shape(300, 400) == (224, 298)  # int(224 * 400 / 300) = int(298.67)
    assert M.pie_resize_shape(400, 300) == (298, 224)
    assert M.pie_resize_shape(512, 1536) == (160, 480)  # 672 > 480: capped, short = int(480 * 224 / 672)


def test_pie_dino_input_keeps_0_255_values_with_imagenet_statistics():
    """PIE-Bench feeds float(uint8) pixels to Normalize(ImageNet mean, std): no division by 255."""
    white = np.full((224, 224, 3), 255, np.uint8)
    black = np.zeros((224, 224, 3), np.uint8)
    x = M.pie_dino_input(white)
    assert x.shape == (1, 3, 224, 224)
    # (255 - 0.485) / 0.229, (255 - 0.456) / 0.224, (255 - 0.406) / 0.225
    assert x[0, :, 0, 0].tolist() == pytest.approx([1111.4192139, 1136.3571429, 1131.5288889], rel=1e-6)
    y = M.pie_dino_input(black)
    assert y[0, :, 5, 7].tolist() == pytest.approx([-2.1179039, -2.0357143, -1.8044444], rel=1e-6)
    # a grey level of 100 on the [0, 1] scale would be 100/255 = 0.392 -> -0.405; PIE-Bench's is 434.56
    grey = M.pie_dino_input(np.full((8, 8, 3), 100, np.uint8), size=8)
    assert grey[0, 0, 0, 0].item() == pytest.approx((100 - 0.485) / 0.229, rel=1e-6)


def test_pie_dino_input_resizes_bilinear_without_antialias():
    """Halving with bilinear, align_corners False, no antialias averages each 2x2 block exactly."""
    img = np.zeros((4, 4, 3), np.uint8)
    img[:, :, 0] = [[0, 40, 80, 120], [40, 80, 120, 160], [200, 200, 0, 0], [0, 0, 100, 100]]
    x = M.pie_dino_input(img, size=2, max_size=None)
    r = x[0, 0] * 0.229 + 0.485  # undo the normalisation of the red channel
    assert r.tolist() == [pytest.approx([40.0, 120.0], abs=1e-3), pytest.approx([100.0, 50.0], abs=1e-3)]


def test_structure_distance_feeds_pie_input_to_the_vit(vit, monkeypatch):
    seen = []
    real = M._keys_self_similarity
    monkeypatch.setattr(M, "_keys_self_similarity", lambda v, x: seen.append(x) or real(v, x))
    white = torch.ones(1, 3, 64, 64)
    M.structure_distance(white, white, model=vit)
    assert len(seen) == 2 and seen[0].shape == (1, 3, 32, 32)  # the test ViT's image_size
    assert seen[0][0, 0].max().item() == pytest.approx((255 - 0.485) / 0.229, rel=1e-5)


def test_evaluate_pair_lpips_is_squeeze_and_ns_lpips_is_alex(monkeypatch):
    nets = {}
    monkeypatch.setattr(M, "lpips", lambda a, b, mask=None, net="alex": nets.setdefault("lpips", net) and 0.0)
    monkeypatch.setattr(M, "ns_lpips", lambda a, b, att, net="alex": nets.setdefault("ns_lpips", net) and 0.0)
    M.evaluate_pair(const(0.5), const(0.6), attention_map=torch.rand(4, 4))
    assert nets == {"lpips": "squeeze", "ns_lpips": "alex"}
    from stylediffusion.bench.pie import build_parser

    assert build_parser().get_default("lpips_net") == "squeeze"

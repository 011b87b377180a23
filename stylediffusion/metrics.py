"""Image-editing metrics as reported by PIE-Bench and the StyleDiffusion paper.

Conventions (one for the whole module, so numbers are comparable across callers):

* Images are float tensors ``(N, 3, H, W)`` in ``[0, 1]`` (``to_image_tensor`` converts PIL images,
  ``uint8`` arrays and 3-D tensors). Every metric returns one Python ``float``: the mean over the
  batch of the per-image values.
* Masks are ``(N, 1, H, W)`` or ``(H, W)`` (bool, integer or float), **1 = the region that counts**.
  A mask of another size is resized (nearest) to the image.
* Masked pixel metrics follow PIE-Bench exactly: both images are multiplied by the mask (pixels
  outside become 0) and the metric is then computed over the *whole* image. The zeroed pixels
  agree, so they count as perfect matches: masked MSE is ``sum(mask * diff^2) / (3*H*W)``, not a
  mean over the masked pixels only. Use the same convention when comparing with published tables.
* A metric that cannot be computed here (missing torchvision, missing backbone weights) is a
  ``MetricUnavailable`` carrying the reason, never a number, so a table can never show a made-up 0.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTokenizer, ViTModel

from stylediffusion import optional
from stylediffusion.clip_preprocess import CLIP_MEAN, CLIP_STD, clip_pixel_values  # noqa: F401 (CLIP_* re-exported)
from stylediffusion.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_DINO = "facebook/dino-vitb8"
_TOKENIZER_DIR = Path(__file__).parent / "assets" / "clip_tokenizer"


@dataclass(frozen=True)
class MetricUnavailable:
    """Stands in for a metric that could not be computed; ``reason`` says why (shown as ``n/a``)."""

    reason: str

    def __str__(self) -> str:
        return f"n/a ({self.reason})"


# ----------------------------------------------------------------------------- conversion helpers
def to_image_tensor(image: Any) -> torch.Tensor:
    """PIL image / ``uint8`` or float array ``(H,W,3)``/``(N,H,W,3)`` / tensor -> ``(N,3,H,W)`` float in [0,1]."""
    if isinstance(image, torch.Tensor):
        t = image.detach()
        if t.dtype == torch.uint8:
            t = t.float() / 255.0
        t = t.float()
        return t.unsqueeze(0) if t.dim() == 3 else t
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    t = torch.from_numpy(arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32))
    if t.dim() == 3:
        t = t.unsqueeze(0)
    return t.permute(0, 3, 1, 2).contiguous()


def to_mask_tensor(mask: Any, like: torch.Tensor) -> torch.Tensor:
    """Mask in any accepted form -> float ``(N,1,H,W)`` matching ``like``'s batch and size.

    Bool/integer masks become {0,1} (any non-zero value counts, so 0/255 PNGs work); float masks
    are kept as given, which lets ``ns_lpips`` pass a soft mask through the same path.
    """
    if hasattr(mask, "convert"):
        mask = np.asarray(mask.convert("L"))
    m = torch.as_tensor(np.array(mask) if not isinstance(mask, torch.Tensor) else mask).detach()
    m = (m != 0).float() if not torch.is_floating_point(m) else m.float()
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.shape[1] != 1:
        raise ValueError(f"mask must have one channel, got shape {tuple(m.shape)}")
    if m.shape[-2:] != like.shape[-2:]:
        m = F.interpolate(m, size=like.shape[-2:], mode="nearest")
    return m.to(like.device).expand(like.shape[0], 1, *like.shape[-2:])


def _pair(a: Any, b: Any, mask: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert both images (and apply PIE-Bench's multiply-by-mask convention when given)."""
    a = to_image_tensor(a)
    b = to_image_tensor(b).to(a.device)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if mask is not None:
        m = to_mask_tensor(mask, a)
        a, b = a * m, b * m
    return a, b


def _torchmetrics_functional():
    return optional.load("torchmetrics.functional.image")


# ----------------------------------------------------------------------------- pixel metrics
def mse(a: Any, b: Any, mask: Any = None) -> float:
    """Mean squared error over all pixels and channels (masked: PIE-Bench convention, see module doc)."""
    a, b = _pair(a, b, mask)
    return float(((a - b) ** 2).mean(dim=(1, 2, 3)).mean())


def psnr(a: Any, b: Any, mask: Any = None) -> float:
    """PSNR in dB with data range 1.0 (torchmetrics), per image then averaged; ``inf`` if identical."""
    a, b = _pair(a, b, mask)
    vals = _torchmetrics_functional().peak_signal_noise_ratio(
        a, b, data_range=1.0, reduction="none", dim=(1, 2, 3)
    )
    return float(vals.mean())


def ssim(a: Any, b: Any, mask: Any = None) -> float:
    """SSIM (torchmetrics defaults: 11x11 Gaussian, sigma 1.5, data range 1.0), per image then averaged."""
    a, b = _pair(a, b, mask)
    vals = _torchmetrics_functional().structural_similarity_index_measure(
        a, b, data_range=1.0, reduction="none"
    )
    return float(vals.mean())


# ----------------------------------------------------------------------------- LPIPS
@functools.lru_cache(maxsize=4)
def _lpips_module(net: str, device: str):
    m = (
        optional.load("torchmetrics.image.lpip")
        .LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True)
        .to(device)
    )
    return _freeze(m)


def lpips(a: Any, b: Any, mask: Any = None, net: str = "alex") -> float | MetricUnavailable:
    """LPIPS (torchmetrics, inputs in [0,1]); masked by multiplication like the pixel metrics.

    Needs torchvision and its ImageNet backbone weights (downloaded once into ``$TORCH_HOME``);
    without them the result is ``MetricUnavailable`` with the reason instead of a number.
    """
    a, b = _pair(a, b, mask)
    try:
        module = _lpips_module(net, str(a.device))
    except Exception as e:  # ImportError/ModuleNotFoundError (torchvision) or download failure
        return MetricUnavailable(f"LPIPS needs torchvision and the '{net}' backbone weights: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": "))
    with torch.inference_mode():
        vals = [module(a[i : i + 1].clamp(0, 1), b[i : i + 1].clamp(0, 1)) for i in range(a.shape[0])]
    return float(torch.stack(vals).mean())


def ns_lpips(a: Any, b: Any, attention_map: Any, net: str = "alex") -> float | MetricUnavailable:
    """NS-LPIPS (StyleDiffusion): LPIPS of both images times ``1 - normalised attention map``.

    The edit word's cross-attention map marks what should change; min-max normalising it to [0,1]
    per image, resizing it bilinearly to the image and inverting it gives a soft background mask, so
    the score measures how much the *non-edited* part changed.
    """
    img = to_image_tensor(a)
    att = torch.as_tensor(np.asarray(attention_map) if not isinstance(attention_map, torch.Tensor)
                          else attention_map).detach().float()
    while att.dim() < 4:
        att = att.unsqueeze(0)
    att = att.mean(dim=1, keepdim=True)
    lo = att.amin(dim=(2, 3), keepdim=True)
    hi = att.amax(dim=(2, 3), keepdim=True)
    att = (att - lo) / (hi - lo).clamp_min(1e-8)
    att = F.interpolate(att, size=img.shape[-2:], mode="bilinear", align_corners=False).clamp(0, 1)
    return lpips(a, b, mask=1.0 - att, net=net)


# ----------------------------------------------------------------------------- backbones
class ClipBackbone(NamedTuple):
    """A CLIPModel with its tokenizer (what ``clip_score`` needs)."""

    model: Any
    tokenizer: Any


def _freeze(module):
    """Metrics never train their backbones: eval mode (no dropout) and no gradients."""
    module.eval()
    module.requires_grad_(False)
    return module


def _bundled_clip_tokenizer():
    return CLIPTokenizer(str(_TOKENIZER_DIR / "vocab.json"), str(_TOKENIZER_DIR / "merges.txt"))


@functools.lru_cache(maxsize=4)
def _load_cached(kind: str, name_or_path: str, device: str):
    if kind == "clip":
        model = CLIPModel.from_pretrained(name_or_path)
        try:  # offline, from_pretrained may return an *empty* tokenizer rather than raising
            tok = CLIPTokenizer.from_pretrained(name_or_path)
            if tok.vocab_size < 1000:
                raise OSError("empty tokenizer")
        except (OSError, ValueError):
            tok = _bundled_clip_tokenizer()  # OpenAI CLIP's BPE, shared by all OpenAI CLIP models
        return ClipBackbone(_freeze(model.to(device)), tok)

    return _freeze(ViTModel.from_pretrained(name_or_path, add_pooling_layer=False).to(device))


_FLAG = {"clip": "--clip_model", "dino": "--dino_model"}


def load_backbone(kind: str, name_or_path: str, device: str | torch.device | None = None):
    """Load (once, cached per name and device) a frozen metric backbone.

    ``kind`` is ``"clip"`` (returns ``ClipBackbone``) or ``"dino"`` (returns a ``ViTModel``);
    ``name_or_path`` is a Hugging Face hub id (taken from the local cache when offline) or a local
    folder. A backbone that cannot be found raises ``UserError`` with one line saying what to do.
    """
    if kind not in _FLAG:
        raise ValueError(f"unknown backbone kind {kind!r}; expected one of {sorted(_FLAG)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    name = str(name_or_path)
    try:
        return _load_cached(kind, name, str(device))
    except (OSError, ValueError) as e:
        what = ("could not be loaded from that folder" if os.path.isdir(name)
                else "is neither a local folder nor a hub id in the local Hugging Face cache")
        raise UserError(
            f"{kind.upper()} backbone '{name}' {what}: pass "
            f"{_FLAG[kind]} /path/to/local/folder or download it once with network access "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e


def _as_clip(model: Any, tokenizer: Any, device) -> ClipBackbone:
    if isinstance(model, (str, os.PathLike)):
        bb = load_backbone("clip", str(model), device)
        return ClipBackbone(bb.model, tokenizer or bb.tokenizer)
    if isinstance(model, tuple):
        return ClipBackbone(model[0], tokenizer or model[1])
    return ClipBackbone(model, tokenizer or _bundled_clip_tokenizer())


# ----------------------------------------------------------------------------- CLIP score
def clip_score(image: Any, text: str | Sequence[str], mask: Any = None, model: Any = DEFAULT_CLIP,
               tokenizer: Any = None, device: str | torch.device | None = None) -> float:
    """CLIP similarity ``max(100 * cos(image, text), 0)`` (as torchmetrics' CLIPScore), batch mean.

    With ``mask`` the image is multiplied by it first (PIE-Bench's "edited part" score).
    ``model`` is a hub id / folder (loaded via ``load_backbone``), a ``ClipBackbone`` or
    ``(model, tokenizer)`` tuple, or a bare ``CLIPModel`` (then the bundled OpenAI CLIP tokenizer is
    used unless ``tokenizer`` is given). Passed-in models are used as they are: put them in eval mode.
    """
    img = to_image_tensor(image)
    if mask is not None:
        img = img * to_mask_tensor(mask, img)
    texts = [text] if isinstance(text, str) else list(text)
    if len(texts) == 1 and img.shape[0] > 1:
        texts = texts * img.shape[0]
    if len(texts) != img.shape[0]:
        raise ValueError(f"{len(texts)} prompts for {img.shape[0]} images")
    bb = _as_clip(model, tokenizer, device)
    dev = next(bb.model.parameters()).device
    cfg = bb.model.config
    pixels = clip_pixel_values(img.to(dev), cfg.vision_config.image_size)
    tokens = bb.tokenizer(texts, padding=True, truncation=True,
                          max_length=cfg.text_config.max_position_embeddings, return_tensors="pt")
    with torch.inference_mode():
        # vision/text towers + projections directly: stable across transformers 4.x and 5.x returns
        img_emb = bb.model.visual_projection(bb.model.vision_model(pixel_values=pixels).pooler_output)
        txt_emb = bb.model.text_projection(bb.model.text_model(
            input_ids=tokens["input_ids"].to(dev), attention_mask=tokens["attention_mask"].to(dev)
        ).pooler_output)
        cos = F.cosine_similarity(img_emb.float(), txt_emb.float(), dim=-1)
    return float((100.0 * cos).clamp_min(0).mean())


# ----------------------------------------------------------------------------- structure distance
def _last_key_projection(vit) -> torch.nn.Module:
    """The last layer's key projection: ``layers[-1].attention.k_proj`` (transformers 5) or
    ``encoder.layer[-1].attention.attention.key`` (transformers 4)."""
    layers = vit.layers if hasattr(vit, "layers") else vit.encoder.layer
    att = layers[-1].attention
    return att.k_proj if hasattr(att, "k_proj") else att.attention.key


def _keys_self_similarity(vit, x: torch.Tensor) -> torch.Tensor:
    """Cosine self-similarity ``(N, T, T)`` of the last layer's keys (all tokens incl. CLS, heads
    concatenated: the key projection's output is already the per-head keys side by side)."""
    captured = {}
    handle = _last_key_projection(vit).register_forward_hook(lambda m, i, o: captured.__setitem__("k", o))
    try:
        vit(pixel_values=x, interpolate_pos_encoding=True)
    finally:
        handle.remove()
    k = F.normalize(captured["k"].float(), dim=-1)
    return k @ k.transpose(-1, -2)


def pie_resize_shape(h: int, w: int, size: int = 224, max_size: int | None = 480) -> tuple[int, int]:
    """Output size of torchvision's ``Resize(size, max_size=max_size)``, which PIE-Bench applies before
    DINO: the shorter side becomes ``size``, the longer ``int(size * long / short)``; if that exceeds
    ``max_size`` the longer side becomes ``max_size`` and the shorter ``int(max_size * size / long)``."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if w <= h else (new_short, new_long)


def pie_dino_input(x: Any, size: int = 224, max_size: int | None = 480) -> torch.Tensor:
    """The DINO input exactly as PIE-Bench's evaluation builds it (``calculate_structure_distance``):
    pixel values kept in 0..255 (the image array cast to float, *no* division by 255), resized with
    torchvision's ``Resize(size, max_size)`` (bilinear; no antialiasing, which is what torchvision
    before 0.17, current when PIE-Bench was published, does on tensors), then ``Normalize`` with the
    ImageNet mean/std meant for [0, 1] inputs. So a white pixel becomes (255 - 0.485) / 0.229 =
    1111.42, not 2.25: published structure distances are on this scale.
    """
    img = to_image_tensor(x) * 255.0
    nh, nw = pie_resize_shape(img.shape[-2], img.shape[-1], size, max_size)
    if (nh, nw) != tuple(img.shape[-2:]):
        img = F.interpolate(img, size=(nh, nw), mode="bilinear", align_corners=False, antialias=False)
    mean = torch.tensor(IMAGENET_MEAN, device=img.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=img.device).view(1, 3, 1, 1)
    return (img - mean) / std


def structure_distance(a: Any, b: Any, model: Any = DEFAULT_DINO,
                       device: str | torch.device | None = None) -> float:
    """DINO-ViT structure distance as PIE-Bench computes it: MSE between the two images' last-layer
    key self-similarity matrices (Tumanyan et al.'s definition), on PIE-Bench's input scale
    (:func:`pie_dino_input`: 0..255 values, ImageNet mean/std). 0 = same structure; lower is better.

    The resize targets the model's ``image_size`` (224 for DINO ViT-B/8, PIE-Bench's setting) with
    PIE-Bench's 480 cap on the longer side scaled alike. ``model`` is a hub id / folder or an
    already-loaded ``ViTModel``.
    """
    vit = load_backbone("dino", str(model), device) if isinstance(model, (str, os.PathLike)) else model
    dev = next(vit.parameters()).device
    a, b = _pair(a, b)
    size = int(vit.config.image_size)
    max_size = (480 * size) // 224

    with torch.inference_mode():
        sa = _keys_self_similarity(vit, pie_dino_input(a, size, max_size).to(dev))
        sb = _keys_self_similarity(vit, pie_dino_input(b, size, max_size).to(dev))
    return float(((sa - sb) ** 2).mean(dim=(1, 2)).mean())


# ----------------------------------------------------------------------------- aggregate
def evaluate_pair(source: Any, edited: Any, *, background_mask: Any = None, target_prompt: str | None = None,
                  edit_mask: Any = None, backbones: Mapping[str, Any] | None = None,
                  attention_map: Any = None, device: str | torch.device | None = None
                  ) -> dict[str, float | MetricUnavailable]:
    """All PIE-Bench metrics (plus NS-LPIPS) for one source/edited pair; never raises for a missing
    backbone or library: that metric becomes ``MetricUnavailable``.

    ``backbones``: ``{"clip": hub id | folder | ClipBackbone | (model, tokenizer), "dino": hub id |
    folder | ViTModel, "lpips": "alex" | "vgg" | "squeeze", "ns_lpips": ...}``; an absent clip/dino
    key makes its metrics unavailable (nothing is fetched implicitly). LPIPS uses SqueezeNet unless
    told otherwise (PIE-Bench's ``LearnedPerceptualImagePatchSimilarity(net_type='squeeze')``);
    NS-LPIPS uses AlexNet (the StyleDiffusion authors' script). Pixel metrics and LPIPS use ``background_mask``
    (default ``1 - edit_mask`` when only the edit mask is known; whole image when neither is).
    Keys: structure_distance, psnr, lpips, mse, ssim, clip_whole, clip_edited, ns_lpips.
    """
    backbones = dict(backbones or {})
    if background_mask is None and edit_mask is not None:
        em = to_mask_tensor(edit_mask, to_image_tensor(source))
        background_mask = 1.0 - em
    out: dict[str, float | MetricUnavailable] = {}

    def guarded(name, fn, needs=None):
        if needs is not None and backbones.get(needs) is None:
            out[name] = MetricUnavailable(f"no {needs} backbone given")
            return
        try:
            out[name] = fn()
        except UserError as e:
            out[name] = MetricUnavailable(str(e))

    guarded("structure_distance", lambda: structure_distance(source, edited, backbones["dino"], device), "dino")
    guarded("psnr", lambda: psnr(source, edited, background_mask))
    net = backbones.get("lpips", "squeeze")
    guarded("lpips", lambda: lpips(source, edited, background_mask, net=net))
    guarded("mse", lambda: mse(source, edited, background_mask))
    guarded("ssim", lambda: ssim(source, edited, background_mask))
    for name, m in (("clip_whole", None), ("clip_edited", edit_mask)):
        if target_prompt is None:
            out[name] = MetricUnavailable("no target prompt given")
        elif name == "clip_edited" and m is None:
            out[name] = MetricUnavailable("no edit mask given")
        else:
            guarded(name, lambda m=m: clip_score(edited, target_prompt, m, backbones["clip"], device=device), "clip")
    if attention_map is None:
        out["ns_lpips"] = MetricUnavailable("no attention map given")
    else:
        guarded("ns_lpips", lambda: ns_lpips(source, edited, attention_map, net=backbones.get("ns_lpips", "alex")))
    return out

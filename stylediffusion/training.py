"""StyleDiffusion training: one mapping network per DDIM step, fitted along the inversion trajectory.

For step i (0 = noisiest), starting from the pivot z~_t (z*_T at i = 0):
  eps_u = UNet(z~_t, t, c_uncond)                        once, no grad
  repeat K_i = ceil(K exp(-0.1 i)) times (fresh Adam, lr 1e-2 (1 - i/100)):
      v     = M_i(E(x), c)                               value input of every cross-attention layer
      eps_c = UNet(z~_t, t, keys from c, values from v)
      z~    = DDIM(eps_u + w (eps_c - eps_u), z~_t)
      loss  = MSE(z~, z*_{t-1}) + sum over mid-low layers MSE(A_i, A*_i)
      stop early when loss < 1e-5 + 2e-5 i
  z~_{t-1} = DDIM step with the learned M_i (no grad)
Only M_i has gradients; every pretrained weight is frozen.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .attention_control import BatchLayout, CrossAttentionRecorder, controlled, install_attention_control
from .ddim import DDIMSchedule, guided
from .defaults import GUIDANCE_SCALE, LEARNING_RATE, NUM_INNER_STEPS
from .errors import UserError
from .mapping import MappingNetworks
from .models import ModelBundle
from .sampling import InversionTrajectory, predict


@dataclass
class TrainConfig:
    num_inner_steps: int = NUM_INNER_STEPS  # K
    guidance_scale: float = GUIDANCE_SCALE
    lr: float = LEARNING_RATE
    attention_loss: bool = True
    attention_weight: float = 1.0
    early_stop: bool = True
    warm_start: bool = True  # M_i starts as a copy of M_{i-1} (released code)
    # Which cross-attention input M_i feeds: "value" (StyleDiffusion), or the paper's ablations "key"
    # (learned keys, plain values) and "key_value" (both learned).
    embedding: str = "value"

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["embedding"] == "value":  # the default leaves checkpoint metadata as it always was
            del d["embedding"]
        return d


EMBEDDINGS = ("value", "key", "key_value")


def embedding_inputs(embedding: str, learned: torch.Tensor | None) -> dict:
    """``predict`` keyword arguments that put the learned embedding into the values, the keys or both."""
    if embedding not in EMBEDDINGS:
        raise UserError(f"embedding {embedding!r} is not one of {', '.join(EMBEDDINGS)}.")
    if learned is None:
        return {}
    return {"values": learned} if embedding == "value" else \
        {"keys": learned} if embedding == "key" else {"keys": learned, "values": learned}


def inner_steps(num_inner_steps: int, i: int) -> int:
    """K_i = ceil(K exp(-0.1 i)): later (less noisy) steps need fewer iterations."""
    return math.ceil(num_inner_steps * math.exp(-0.1 * i))


def step_lr(lr: float, i: int) -> float:
    return lr * (1 - i / 100)


def early_stop_threshold(i: int) -> float:
    return 1e-5 + i * 2e-5


def gradient_scaler(bundle: ModelBundle) -> torch.amp.GradScaler:
    """Dynamic loss scaling when the UNet computes in float16 (float16 weights, or float32 weights under
    float16 autocast); a no-op (bit-identical) otherwise.

    The gradient a latent MSE sends into the UNet is about 2 r / N per element (N = 16,384 for SD's
    64x64x4 latent, residual r ~ 1e-3 late in training): below float16's smallest normal number
    (6e-5), so an unscaled float16 backward returns mostly or all zero gradients (measured in
    docs/performance.md). bfloat16 has float32's exponent range and needs no scaling.
    """
    enabled = bundle.compute_dtype == torch.float16
    return torch.amp.GradScaler(bundle.device.type, enabled=enabled)


def attention_loss(maps: list[torch.Tensor], reference: list[torch.Tensor]) -> torch.Tensor:
    if len(maps) != len(reference):
        raise RuntimeError(f"{len(maps)} mid-low maps recorded but {len(reference)} reference maps")
    return sum(F.mse_loss(a.float(), r.to(a.device, torch.float32)) for a, r in zip(maps, reference))


def iteration_loss(bundle: ModelBundle, schedule: DDIMSchedule, z: torch.Tensor, i: int, eps_u: torch.Tensor,
                   values: torch.Tensor, cond: torch.Tensor, target: torch.Tensor, reference: list[torch.Tensor],
                   state, recorder: CrossAttentionRecorder, cfg: TrainConfig) -> torch.Tensor:
    """One inner iteration's loss: the guided DDIM step with the learned ``values`` against z*_{t-1},
    plus the mid-low attention loss against ``reference`` when there is one (and cfg asks for it)."""
    use_att = cfg.attention_loss and bool(reference)
    recorder.reset()
    layout = BatchLayout.single()
    with controlled(state, recorder if use_att else None):
        eps_c = predict(bundle, schedule, z, i, cond, layout, **embedding_inputs(cfg.embedding, values))
    z_prev = schedule.sample_step(guided(eps_u, eps_c, cfg.guidance_scale), z, i)
    loss = F.mse_loss(z_prev, target)
    if use_att:
        loss = loss + cfg.attention_weight * attention_loss(recorder.maps.get(i, []), reference)
    return loss


@dataclass
class StepReport:
    step: int
    iterations: int
    loss: float


def fit_step(
    bundle: ModelBundle,
    schedule: DDIMSchedule,
    z: torch.Tensor,
    i: int,
    eps_u: torch.Tensor,
    mapper,
    image_features: torch.Tensor,
    cond: torch.Tensor,
    target: torch.Tensor,
    reference: list,
    state,
    recorder,
    cfg: TrainConfig,
    scaler,
    num_iterations: int,
    bar,
    what: str = "training",
) -> tuple[int, float]:
    """Adam on M_i alone at the pivot ``z`` for up to ``num_iterations`` iterations (early stop as released);
    (iterations run, last loss). ``what`` names the loss in the error line."""
    mapper.requires_grad_(True)
    optimizer = torch.optim.Adam(mapper.parameters(), lr=step_lr(cfg.lr, i))
    it, loss_value = 0, float("nan")
    for it in range(1, num_iterations + 1):
        loss = iteration_loss(bundle, schedule, z, i, eps_u, mapper(image_features, cond), cond, target, reference,
                              state, recorder, cfg)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise UserError(f"the {what} loss became {loss_value} at DDIM step {i}, iteration {it}: lower --lr, "
                            f"or use --dtype float32 if you trained in half precision.")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        bar.update(1)
        bar.set_postfix(step=f"{i + 1}/{schedule.num_steps}", loss=f"{loss_value:.2e}")
        if cfg.early_stop and loss_value < early_stop_threshold(i):
            break
    bar.update(num_iterations - it)
    mapper.requires_grad_(False)
    recorder.reset()
    return it, loss_value


def train_mapping_networks(
    bundle: ModelBundle, schedule: DDIMSchedule, trajectory: InversionTrajectory, image_features: torch.Tensor,
    cond: torch.Tensor, uncond: torch.Tensor, mappers: MappingNetworks, cfg: TrainConfig, *,
    start_step: int = 0, z_start: torch.Tensor | None = None,
    on_step_done: Callable[[int, torch.Tensor], None] | None = None, progress: bool = True,
    recorder: CrossAttentionRecorder | None = None,
) -> list[StepReport]:
    """Fit ``mappers[start_step:]`` in order; ``z_start`` is the pivot latent when resuming.

    ``recorder``: the attention loss's recorder (``keep_grad=True``) to use instead of the default one
    (benchmarks pass one that also asks for explicit attention in every layer)."""
    state = install_attention_control(bundle.unet)
    if recorder is None:
        recorder = CrossAttentionRecorder(keep_grad=True)
    layout = BatchLayout.single()
    T = schedule.num_steps
    mappers.to(bundle.device).train()
    z = (trajectory.z_T if z_start is None else z_start).to(bundle.device)
    reports = []
    scaler = gradient_scaler(bundle)
    total = sum(inner_steps(cfg.num_inner_steps, i) for i in range(start_step, T))
    bar = tqdm(total=total, desc="StyleDiffusion training", disable=not progress)
    for i in range(start_step, T):
        mapper = mappers[i]
        if cfg.warm_start and i > 0:
            mapper.load_state_dict(mappers[i - 1].state_dict())
        target = trajectory.target_for_step(i).to(bundle.device)
        with torch.no_grad():
            eps_u = predict(bundle, schedule, z, i, uncond, layout)
        it, loss_value = fit_step(bundle, schedule, z, i, eps_u, mapper, image_features, cond, target,
                                  trajectory.maps.get(i, []), state, recorder, cfg, scaler,
                                  inner_steps(cfg.num_inner_steps, i), bar)
        with torch.no_grad():
            eps_c = predict(bundle, schedule, z, i, cond, layout,
                            **embedding_inputs(cfg.embedding, mapper(image_features, cond)))
            z = schedule.sample_step(guided(eps_u, eps_c, cfg.guidance_scale), z, i)
        reports.append(StepReport(i, it, loss_value))
        if on_step_done is not None:
            on_step_done(i, z)
    bar.close()
    return reports

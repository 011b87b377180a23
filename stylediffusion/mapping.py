"""The per-timestep mapping networks M_i: CLIP image features -> value input of cross-attention.

"modulate" (the authors' released code, default): 1x1 convolutions over the token axis turn the
197 image tokens into 2*77 rows, split into gamma and beta, and the value input is c * gamma + beta.
"replace" (the paper's Table 1): 197 -> 77 -> 77, used directly as the value input.
BatchNorm never tracks running statistics: the released code kept it in training mode, i.e. it
always normalises with the statistics of the current input, at training and edit time alike.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .defaults import VARIANT, VARIANTS


@dataclass(frozen=True)
class MappingConfig:
    image_tokens: int  # 197 for CLIP ViT-B/16 at 224
    image_width: int  # 768 for ViT-B/16
    text_tokens: int  # 77
    text_width: int  # 768 for SD1, 1024 for SD2
    variant: str = VARIANT
    hidden_layers: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


class MappingNetwork(nn.Module):
    def __init__(self, cfg: MappingConfig):
        super().__init__()
        self.cfg = cfg
        # ViT-B/16 (768) matches SD1's text width by coincidence; elsewhere a learned map bridges them.
        self.bridge = nn.Linear(cfg.image_width, cfg.text_width) if cfg.image_width != cfg.text_width else nn.Identity()
        rows = 2 * cfg.text_tokens if cfg.variant == "modulate" else cfg.text_tokens
        layers: list[nn.Module] = [nn.Conv1d(cfg.image_tokens, rows, 1)]
        for _ in range(cfg.hidden_layers):
            layers += [nn.Conv1d(rows, rows, 1), nn.BatchNorm1d(rows, track_running_stats=False), nn.LeakyReLU(0.01)]
        if cfg.variant == "replace":
            # Table 1: 197 -> 77 -> 77; the BN + LeakyReLU sit between the two maps.
            layers = [nn.Conv1d(cfg.image_tokens, rows, 1), nn.BatchNorm1d(rows, track_running_stats=False),
                      nn.LeakyReLU(0.01)]
        layers.append(nn.Conv1d(rows, rows, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, image_features: torch.Tensor, text_embedding: torch.Tensor) -> torch.Tensor:
        """(1, image_tokens, image_width), (n, text_tokens, text_width) -> value input (n, text_tokens, text_width).

        Rows past ``text_tokens`` (SDXL's pooled row, families.py) are not cross-attention input: they pass
        through unchanged, so the pooled conditioning stays the plain prompt's.
        """
        h = self.net(self.bridge(image_features))
        tokens, extra = text_embedding[:, :self.cfg.text_tokens], text_embedding[:, self.cfg.text_tokens:]
        if self.cfg.variant == "replace":
            values = h.expand(text_embedding.shape[0], -1, -1)
        else:
            gamma, beta = h.chunk(2, dim=1)
            values = tokens * gamma + beta
        return torch.cat([values, extra], dim=1) if extra.shape[1] else values


class MappingNetworks(nn.Module):
    """M_0 ... M_{T-1}; index 0 is the noisiest DDIM step."""

    def __init__(self, cfg: MappingConfig, num_steps: int):
        super().__init__()
        if cfg.variant not in VARIANTS:
            raise ValueError(f"unknown mapping variant {cfg.variant!r}; choose one of {VARIANTS}")
        self.cfg = cfg
        self.mappers = nn.ModuleList(MappingNetwork(cfg) for _ in range(num_steps))

    def __len__(self) -> int:
        return len(self.mappers)

    def __getitem__(self, i: int) -> MappingNetwork:
        return self.mappers[i]

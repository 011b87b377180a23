"""The loop every training stage shares: seeding, resume, learning-rate schedule, tqdm, periodic
checkpoint and loss plot, wall-time cap."""

from __future__ import annotations

import math
import sys
import time
from typing import Dict, List

import numpy as np
import torch
from tqdm import tqdm

from stylediffusion.testbed import model as M

from .stage_files import load_training_stage, plot_losses, save_training_stage

STAGES = ("clip", "vae", "unet", "vae_decoder")


def lr_at(step: int, total: int, base: float, warmup: int = 50) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``base`` to ``base / 10``."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def tokenize(tok, captions: List[str]) -> torch.Tensor:
    return tok(captions, padding="max_length", max_length=M.MAX_LENGTH, truncation=True,
               return_tensors="pt").input_ids


class TrainingStage:
    """One stage's optimiser, generators and record (``meta``), and the loop that runs its steps."""

    def __init__(self, args, stage: str, modules: Dict[str, torch.nn.Module], params, lr: float):
        self.args, self.stage, self.modules = args, stage, modules
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0 if stage == "vae" else 1e-2)
        self.base_lr = lr
        self.meta = dict(stage=stage, step=0, total_steps=args.steps, losses=[], seconds=0.0,
                         batch=args.batch, seed=args.seed, extra={})
        self.rng = np.random.default_rng([args.seed, STAGES.index(stage)])
        torch.manual_seed(args.seed * 10 + STAGES.index(stage))
        if args.resume:
            meta = load_training_stage(args.out, stage, modules, self.opt)
            if meta is not None:
                self.meta = meta
                self.meta["total_steps"] = args.steps
                self.rng.bit_generator.state = meta["np_rng"]
                print(f"[{stage}] resumed at step {meta['step']}", file=sys.stderr)

    def update(self, loss: torch.Tensor) -> float:
        """One optimiser step on the stage's parameters (gradients clipped at norm 1)."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], 1.0)
        self.opt.step()
        return loss.item()

    def record_setting(self, key: str, value) -> None:
        """``extra[key] = value``, and ``extra[key + "_from_step"]`` lists [step, value] whenever it changes:
        a run may change a setting on resume, and the steps each value covered stay on record."""
        extra = self.meta["extra"]
        if extra.get(key) != value:
            extra.setdefault(f"{key}_from_step", []).append([self.meta["step"], value])
        extra[key] = value

    def save(self):
        self.meta["np_rng"] = self.rng.bit_generator.state
        save_training_stage(self.args.out, self.stage, self.modules, self.opt, self.meta)
        plot_losses(self.args.out, self.stage, self.meta["losses"])

    def run(self, step_fn):
        """``step_fn(step) -> loss`` from the stage's current step to ``--steps``; returns the meta."""
        args = self.args
        start = self.meta["step"]
        t_start = time.time()
        t_prev = t_start
        bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=self.stage,
                   mininterval=5.0)
        for step in bar:
            for g in self.opt.param_groups:
                g["lr"] = lr_at(step, args.steps, self.base_lr)
            loss = step_fn(step)
            self.meta["losses"].append(float(loss))
            self.meta["step"] = step + 1
            now = time.time()
            self.meta["seconds"] += now - t_prev
            t_prev = now
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if (step + 1) % args.save_every == 0:
                self.save()
            if args.minutes and now - t_start > 60 * args.minutes:
                print(f"[{self.stage}] time limit reached at step {step + 1}", file=sys.stderr)
                break
        self.save()
        return self.meta

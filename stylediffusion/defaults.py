"""Every default of the method, in one place: the command line, the Python API, the demo, the benchmark
runners and the dataclasses (``TrainConfig``, ``EditSpec``, ``MethodContext``) read them from here
(``specs`` describes each setting once, with these defaults, for the flags and the demo's form).

Plain values only, no torch: the flag builders and the input checks import this before any model loads.
"""
from __future__ import annotations

# Classifier-free guidance w (the paper's and the authors' code's).
GUIDANCE_SCALE = 7.5
# T: DDIM steps of inversion and editing (30 in the StyleDiffusion paper; PIE-Bench's other methods use 50).
NUM_DDIM_STEPS = 30
# K: StyleDiffusion's training iterations at the first step, K_i = ceil(K e^-0.1i).
NUM_INNER_STEPS = 100
# Adam's learning rate at step 0 (decays as 1 - i/100).
LEARNING_RATE = 1e-2
# The mapping network: "modulate" (the authors' released code) or "replace" (the paper's text).
VARIANTS = ("modulate", "replace")
VARIANT = "modulate"
# Prompt-to-Prompt's edits of the cross-attention maps.
EDIT_TYPES = ("Replacement", "Refinement", "Reweight")
# The README's edit defaults: the fractions of steps the target uses the learned values (tau_v) and
# the source's cross-attention (tau_c), self-attention (tau_s) and, for P2Plus, unconditional
# self-attention (tau_u).
TAU_V, TAU_C, TAU_S, TAU_U = 0.5, 0.6, 0.6, 0.0

# The models: a hub id or local folder of Stable Diffusion, and the CLIP vision tower StyleDiffusion maps from.
MODEL = "CompVis/stable-diffusion-v1-4"
IMAGE_ENCODER = "openai/clip-vit-base-patch16"
# The frozen models' dtype names ("auto": ``models.resolve_dtype`` decides per device).
DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")
# torch.manual_seed takes at most 64 bits; seeds are kept to the non-negative half so that every
# seed means one thing on every platform.
SEED, MAX_SEED = 0, 2**63 - 1
# Classifier-free guidance w: 1 = none, 7.5 = the paper's; far beyond 50 every sample saturates.
MAX_GUIDANCE = 50.0
# The methods a run uses when none is named (an edit may name its own inversion: methods.default_inversion).
INVERSION, EDIT = "stylediffusion", "p2p"

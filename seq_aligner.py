"""Prompt-to-Prompt's module name ``seq_aligner`` for ``stylediffusion.seq_aligner`` (token alignment
between a source and an edited prompt), for scripts run from a checkout.

The code lives in the package, and only the package is installed: a top-level ``seq_aligner`` in
site-packages would collide with the many Prompt-to-Prompt forks that ship a file of that name.
This name is the package module itself (not a copy), so ``seq_aligner.X`` and
``stylediffusion.seq_aligner.X`` are always the same object.
"""
import sys

from stylediffusion import seq_aligner

sys.modules[__name__] = seq_aligner

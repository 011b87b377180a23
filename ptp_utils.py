"""Prompt-to-Prompt's module name ``ptp_utils`` for ``stylediffusion.attention_control`` (attention
processors and controllers), for scripts run from a checkout.

The code lives in the package, and only the package is installed: a top-level ``ptp_utils`` in
site-packages would collide with the many Prompt-to-Prompt forks that ship a file of that name.
This name is the package module itself (not a copy), so ``ptp_utils.X`` and
``stylediffusion.attention_control.X`` are always the same object.
"""
import sys

from stylediffusion import attention_control

sys.modules[__name__] = attention_control

"""The meta device standing in for a CUDA GPU, on a machine without one.

Models loaded with ``device="meta"`` hold shapes and dtypes only, and PyTorch refuses an operation
that mixes a meta tensor with a CPU tensor that is not a 0-d scalar (as CUDA refuses a CPU tensor):
so a run on the meta device fails wherever a tensor is made on the wrong device.

``MetaStandsInForCuda`` (a ``TorchDispatchMode``) lets whole runs get to the end there, and watches
the host -> device traffic:
- what a program reads back from the device (``.item()``, ``.cpu()``, ``bool(t)``: the places a GPU
  run waits for the GPU) gets stand-in values: zeros (``True`` for a truth value), so loops take
  their early exits and images come out black;
- every copy from CPU memory to the device is recorded with where it was made (``copies``), so a
  test can say how many a loop makes per step; moving a module's weights there (``module.to``: once
  per run, e.g. the T mapping networks) is counted apart, in ``placements``.

Tensors that ``torch.tensor(data, device=...)`` builds directly on the device do not go through the
dispatcher; a ``TorchFunctionMode`` records those calls as copies too.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
DEVICE = "meta"
_FACTORIES_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}


@dataclass
class Copy:
    what: str
    shape: tuple
    where: str  # the innermost frames of the project's code that made it


def _where() -> str:
    frames = [f for f in traceback.extract_stack()[:-3]
              if "/stylediffusion/" in f.filename or f.filename.endswith(("ptp_utils.py", "edit_w_ptp_v_clip.py"))]
    return " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in reversed(frames[-3:]))


def _stand_in(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.zeros(tensor.shape, dtype=tensor.dtype, device=device)


class _DataFactories(TorchFunctionMode):
    def __init__(self, copies: list[Copy]):
        super().__init__()
        self.copies = copies

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _FACTORIES_FROM_DATA and isinstance(out, torch.Tensor) and out.device.type == DEVICE \
                and not (args and isinstance(args[0], torch.Tensor) and args[0].device.type == DEVICE):
            self.copies.append(Copy(f"torch.{func.__name__}", tuple(out.shape), _where()))
        return out


class MetaStandsInForCuda(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.copies: list[Copy] = []
        self.placements = 0  # parameters moved to the device
        self.reads = 0  # values read back from the device
        self._factories = _DataFactories(self.copies)

    def __enter__(self):
        self._factories.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._factories.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and args[0].device.type == DEVICE:
            self.reads += 1
            return True if args[0].dtype == torch.bool else 0
        if func is aten._to_copy.default and args[0].device.type == DEVICE \
                and torch.device(kwargs.get("device") or DEVICE).type == "cpu":
            self.reads += 1
            return _stand_in(args[0], torch.device("cpu")).to(kwargs.get("dtype") or args[0].dtype)
        if func is aten.copy_.default and args[1].device.type == DEVICE and args[0].device.type == "cpu":
            self.reads += 1
            return args[0].zero_()
        out = func(*args, **kwargs)
        if func in (aten._to_copy.default, aten.copy_.default):
            src = args[1] if func is aten.copy_.default else args[0]
            if isinstance(src, torch.Tensor) and src.device.type == "cpu" and out.device.type == DEVICE:
                if isinstance(src, torch.nn.Parameter):
                    self.placements += 1
                else:
                    self.copies.append(Copy(str(func), tuple(src.shape), _where()))
        return out

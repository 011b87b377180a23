"""Convert ELITE's pickled mapping networks into safetensors, once:

    python -m stylediffusion.convert_elite global_mapper.pt elite_global.safetensors
    python -m stylediffusion.convert_elite local_mapper.pt elite_local.safetensors

The authors (csyxwei/ELITE) distribute ``global_mapper.pt`` and ``local_mapper.pt`` as pickled
``state_dict``s. This command is the only place in the project that reads a pickle, and it reads it
with ``torch.load(weights_only=True)``: the restricted unpickler builds tensors and plain containers
only and refuses any other object, so a file carrying code is refused without running it. The result
must be a flat dict of tensors with exactly the keys and shapes of ELITE's layout for a Stable Diffusion
v1.x UNet (or the UNet of ``--unet_config``); anything else is refused with one line (exit code 2) and
nothing is written. The output is written atomically, with metadata saying what it is (format, kind,
the network's config, the source file's name and SHA-256). Run time (``--elite_global``,
``--elite_local``) reads only such files.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from .elite import config_from_state_dict, metadata, unet_cross_attention_layers
from .errors import UserError
from .files import atomic_write, writable_file
from .flags import ArgumentParser
from .models import quiet_libraries
from .runner import exit_code, package_notes_on_stdout

logger = logging.getLogger(__spec__.name)  # run with -m, __name__ is "__main__": the logger stays under stylediffusion

DEFAULT_UNET_CONFIG = Path(__file__).parent / "configs" / "sd15" / "unet.json"
MAX_BYTES = 4 * 2**30  # the authors' files are about 0.1 GB (global) and 0.2 GB (local)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m stylediffusion.convert_elite",
                       description="Convert ELITE's global_mapper.pt / local_mapper.pt (pickled state dicts) into "
                                   "the safetensors files --elite_global / --elite_local read.")
    p.add_argument("source", type=Path, help="the authors' global_mapper.pt or local_mapper.pt")
    p.add_argument("destination", type=Path, help="where to write the .safetensors file")
    p.add_argument("--kind", choices=("global", "local"), default=None,
                   help="which network the file holds (default: read from the source file name)")
    p.add_argument("--unet_config", type=Path, default=None,
                   help="the UNet config.json whose cross-attention layers the file must match "
                        "(default: Stable Diffusion v1.x, which ELITE was trained for)")
    return p


def source_kind(source: Path, kind: str | None) -> str:
    if kind is not None:
        return kind
    name = source.name.lower()
    found = [k for k in ("global", "local") if k in name]
    if len(found) != 1:
        raise UserError(f"cannot tell from the name '{source.name}' whether it is ELITE's global or local mapper: "
                        f"pass --kind global or --kind local.")
    return found[0]


def expected_layers(unet_config: Path | None) -> dict[str, int]:
    """{authors' layer name: width} of the UNet's cross-attention layers, from its config (built on the meta
    device: no weights are made)."""
    path = unet_config or DEFAULT_UNET_CONFIG
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UserError(f"--unet_config '{path}' is not a readable UNet config.json ({type(err).__name__}).") from err
    return unet_cross_attention_layers(unet)


def read_pickled_state_dict(source: Path) -> dict:
    """The flat tensor dict of an ELITE ``.pt`` file, read with the restricted unpickler; anything else refused."""
    if not source.is_file():
        raise UserError(f"'{source}' {'is a folder' if source.is_dir() else 'does not exist'}: pass the authors' "
                        f"global_mapper.pt or local_mapper.pt.")
    if source.stat().st_size > MAX_BYTES:
        raise UserError(f"'{source}' is {source.stat().st_size / 2**30:.1f} GiB, far larger than an ELITE mapper.")
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # whatever the restricted unpickler objects to, the file is refused
        reason = " ".join(str(err).split())
        if "weights_only" in reason or "Unsupported global" in reason or "GLOBAL" in reason:
            reason = "it holds objects other than tensors (the restricted unpickler refused them; nothing was run)"
        raise UserError(f"'{source}' is not a tensor state dict torch can read safely: {reason[:200]}.") from err
    if not isinstance(state, dict):
        raise UserError(f"'{source}' holds a {type(state).__name__}, not a flat dict of tensors (a state_dict).")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        what = type(state[bad[0]]).__name__
        raise UserError(f"'{source}' is not a flat dict of tensors: the entry {bad[0]!r} is a {what}.")
    if any(not v.is_floating_point() for v in state.values()):
        raise UserError(f"'{source}' holds non-float tensors: not an ELITE mapper.")
    broken = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if broken:
        raise UserError(f"'{source}' holds NaN or infinite weights ({broken[0]!r}): the download is damaged; fetch "
                        "it again.")
    return state


def convert(source: Path, destination: Path, kind: str | None = None, unet_config: Path | None = None) -> Path:
    """Check and convert; returns the written path. Every refusal is a UserError and writes nothing."""
    if destination.suffix != ".safetensors":
        raise UserError(f"the destination '{destination}' must end in .safetensors.")
    writable_file(destination, "the destination")
    kind = source_kind(source, kind)
    state = read_pickled_state_dict(source)
    config = config_from_state_dict(state, kind, f"'{source}'")
    layers = expected_layers(unet_config)
    have = dict(zip(config["attention_layers"], config["attention_widths"]))
    if have != layers:
        odd = sorted(set(have.items()) ^ set(layers.items()))[:2]
        where = f"--unet_config '{unet_config}'" if unet_config else "Stable Diffusion v1.x"
        raise UserError(f"'{source}': its cross-attention projections do not match the UNet of {where} "
                        f"({len(have)} layers in the file, {len(layers)} expected; first differences: {odd}).")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    meta = metadata(kind, config, source.name, digest)
    return atomic_write(destination, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        quiet_libraries()
        args = build_parser().parse_args(argv)
        out = convert(args.source, args.destination, args.kind, args.unet_config)
        with package_notes_on_stdout():
            logger.info(f"wrote {out} (ELITE {source_kind(args.source, args.kind)} mapper; pass it as "
                        f"--elite_{source_kind(args.source, args.kind)})")
        return 0

    return exit_code(body, "interrupted: nothing was written.")


if __name__ == "__main__":
    sys.exit(main())

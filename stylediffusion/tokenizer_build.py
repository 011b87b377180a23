"""Build the Stable Diffusion v1 (CLIP ViT-L/14) tokenizer files from CLIP's BPE merge list.

SD v1 uses OpenAI CLIP's byte-level BPE with 49,408 entries. The merge list ships inside the
open-clip-torch wheel (``open_clip/bpe_simple_vocab_16e6.txt.gz``, MIT licence); this module turns
it into the ``vocab.json`` + ``merges.txt`` pair that ``transformers.CLIPTokenizer`` reads. The
result is committed under ``stylediffusion/assets/clip_tokenizer``; run this only to rebuild it:

    pip download --no-deps open-clip-torch && unzip -j open_clip_torch-*.whl '*bpe_simple*'
    python -m stylediffusion.tokenizer_build bpe_simple_vocab_16e6.txt.gz
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
from pathlib import Path

from .files import atomic_write_text
from .runner import package_notes_on_stdout

logger = logging.getLogger(__spec__.name)  # run with -m, __name__ is "__main__": the logger stays under stylediffusion

# CLIP keeps the first 49,152 - 256 - 2 = 48,894 merges so that the vocabulary is 49,408 long.
NUM_MERGES = 49152 - 256 - 2
ASSET_DIR = Path(__file__).parent / "assets" / "clip_tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP map from bytes to printable unicode symbols (so BPE never sees whitespace)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def build_vocab_and_merges(bpe_lines: list[str]) -> tuple[dict[str, int], list[str]]:
    merges = bpe_lines[1 : NUM_MERGES + 1]  # line 0 is a version header
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_tokenizer_files(bpe_gz: Path, out_dir: Path = ASSET_DIR) -> None:
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    vocab, merges = build_vocab_and_merges(lines)
    atomic_write_text(out_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(out_dir / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    logger.info(f"wrote {len(vocab)} tokens and {len(merges)} merges to {out_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bpe_gz", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out_dir", type=Path, default=ASSET_DIR)
    args = parser.parse_args()
    with package_notes_on_stdout():
        write_tokenizer_files(args.bpe_gz, args.out_dir)


if __name__ == "__main__":
    main()

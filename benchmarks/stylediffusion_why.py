"""Why StyleDiffusion reconstructs worse: per-step plots from ``testbed_inversion.py``'s ``steps.json``.

Two figures, one panel per kind of scene (one object / two objects; the largest object small or
default / large), one line per inversion (mean over the scenes of that kind, log scale):
- ``*_loss.png``: the final training loss of each DDIM step (StyleDiffusion: latent MSE + attention
  loss; Null-text: latent MSE; StyleDiffusion+: latent MSE + attention loss before its offset);
- ``*_drift.png``: how far the source branch of an edit is from the inversion trajectory after each
  step, MSE(z_src, z*_{t-1}): what the optimiser left, accumulated from step to step.

    python benchmarks/stylediffusion_why.py docs/testbed_bench/why_T20/steps.json --out docs/why_T20
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np


def kind(record: dict) -> str:
    objects = "one object" if record["objects"] == 1 else "two objects"
    size = "large" if "large" in record["sizes"].split("+") else "small/default"
    return f"{objects}, largest {size}"


def main(argv=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("steps", type=Path, nargs="+", help="steps.json files of testbed_inversion.py")
    p.add_argument("--out", type=Path, required=True, help="prefix of the PNG files")
    p.add_argument("--methods", nargs="+", default=None, help="only these methods (labels as in steps.json)")
    args = p.parse_args(argv)
    records = {}
    for path in args.steps:
        records.update(json.loads(path.read_text()))
    series = defaultdict(lambda: defaultdict(list))  # (metric, kind) -> method -> per-scene arrays
    for key, rec in records.items():
        method = key.split(":", 1)[1]
        if args.methods and method not in args.methods:
            continue
        k = kind(rec)
        if rec.get("final_losses"):
            series[("loss", k)][method].append(np.asarray(rec["final_losses"], dtype=float))
        series[("drift", k)][method].append(np.asarray(rec["drift"], dtype=float))
    kinds = sorted({k for _, k in series})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for metric, ylabel in (("loss", "final training loss of the step"),
                           ("drift", "MSE(source-branch latent, z*) after the step")):
        fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.4), sharey=True, squeeze=False)
        for ax, k in zip(axes[0], kinds):
            for method, arrays in sorted(series[(metric, k)].items()):
                mean = np.mean(np.stack(arrays), axis=0)
                ax.plot(np.arange(len(mean)), np.maximum(mean, 1e-12), label=f"{method} (n={len(arrays)})")
            ax.set_yscale("log")
            ax.set_title(k, fontsize=9)
            ax.set_xlabel("DDIM step i (0 = noisiest)")
            ax.grid(alpha=.3)
        axes[0][0].set_ylabel(ylabel)
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        path = args.out.with_name(args.out.name + f"_{metric}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        print(f"wrote {path}")
    for k in kinds:  # the numbers behind the plots, for the text
        for method, arrays in sorted(series[("drift", k)].items()):
            final = np.mean([a[-1] for a in arrays])
            losses = series[("loss", k)].get(method)
            mean_loss = np.mean([a.mean() for a in losses]) if losses else float("nan")
            print(f"{k:<35} {method:<40} n={len(arrays):<3} mean step loss {mean_loss:.3e}  final drift {final:.3e}")


if __name__ == "__main__":
    main()

"""StyleDiffusion entry point (the authors' script name): train an inversion, or edit an image.

    python edit_w_ptp_v_clip.py --is_train True --idx 2 --num_inner_steps 20
    python edit_w_ptp_v_clip.py --is_train False --idx 2 --num_inner_steps 20 --edit_type Replacement

Same CLI as ``python -m stylediffusion``; ``--help`` lists every flag.
"""
import sys

from stylediffusion.runner import guard_start_up

if __name__ == "__main__":
    guard_start_up()  # before the command's imports (torch, diffusers): a Ctrl-C while they load is one line
from stylediffusion.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

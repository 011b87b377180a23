import sys

from .runner import guard_start_up

guard_start_up()  # before the command's imports (torch, diffusers): a Ctrl-C while they load is one line
from .cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

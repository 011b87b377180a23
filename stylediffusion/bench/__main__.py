"""``python -m stylediffusion.bench {pie,reproduce,report} ...`` (also under ``accelerate launch -m``)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from ..runner import guard_start_up

if __name__ == "__main__":
    guard_start_up()  # before the command's imports (torch, diffusers): a Ctrl-C while they load is one line
from ..errors import UserError  # noqa: E402
from ..models import quiet_libraries  # noqa: E402
from ..runner import exit_code, package_notes_on_stdout  # noqa: E402
from .pie import main as pie_main  # noqa: E402
from .report import write_reports  # noqa: E402
from .reproduce import main as reproduce_main  # noqa: E402

logger = logging.getLogger(__spec__.name)  # run with -m, __name__ is "__main__": the logger stays under stylediffusion

USAGE = """usage: python -m stylediffusion.bench {pie,reproduce,report} [options]

  pie        run an inversion x edit method over PIE-Bench and score it (--help for options)
  reproduce  labelled input | reconstruction | edit grids for rows of the data index, and a contact sheet
  report     rewrite summary.md, summary.csv and metrics_boxplots.png from OUT/results.csv

Multi-process: accelerate launch --num_processes N -m stylediffusion.bench pie ... (see docs/benchmarks.md)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = (argv[0], argv[1:]) if argv else (None, [])

    def body() -> int:
        with package_notes_on_stdout():
            if command in ("-h", "--help"):
                logger.info(USAGE)
                return 0
            if command not in ("pie", "reproduce", "report"):
                got = f"unknown command {command!r}" if argv else "no command given"
                raise UserError(f"{got}: use pie, reproduce or report (see python -m stylediffusion.bench --help)")
            quiet_libraries()
            return run_command()

    def run_command() -> int:
        if command == "pie":
            pie_main(rest)
        elif command == "reproduce":
            reproduce_main(rest)
        elif command == "report":
            if len(rest) != 1 or rest[0].startswith("-"):
                raise UserError("report takes one argument, the --outdir of a 'pie' run: "
                                "python -m stylediffusion.bench report OUTDIR")
            if not (Path(rest[0]) / "results.csv").is_file():
                raise UserError(f"'{rest[0]}' holds no results.csv: pass the --outdir of a 'pie' run.")
            for path in write_reports(Path(rest[0])):
                logger.info(f"wrote {path}")
        return 0

    return exit_code(body, "interrupted: finished items are kept; rerun the same command to resume.")

if __name__ == "__main__":
    sys.exit(main())

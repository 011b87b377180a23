"""Benchmarks: PIE-Bench runner, batch reproduction of the paper-style grids, reports.

``python -m stylediffusion.bench pie ...``        PIE-Bench over any registered inversion x edit
``python -m stylediffusion.bench reproduce ...``  one labelled grid per row of the data index + contact sheet
``python -m stylediffusion.bench report OUT``     (re)write summary.md / summary.csv / plots of OUT/results.csv

Both runners shard their items over the processes of ``accelerate launch`` (see ``sharding.py``) and
resume where an interrupted run stopped. See docs/benchmarks.md.
"""

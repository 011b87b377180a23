"""Spreading benchmark items over processes (Hugging Face accelerate) and crash-safe result files.

Layout of a run's results (``OUT/results.csv``):

* Every process appends its rows to its own part file ``OUT/parts/<name>.rank<R>.csv``, one row per
  ``write`` followed by ``flush`` + ``fsync``: an interrupted run loses at most the item in progress,
  and a half-written last line (the process died inside ``write``) is dropped when read back.
* The main process merges the part files into the final CSV (deduplicated by key, sorted, written to
  a temporary file and renamed over the old one), then deletes them. It does so at the start of a
  run (to fold in whatever an interrupted run left) and at the end, after ``wait_for_everyone()``.
* Items are split after the already-done ones are removed: rank ``r`` of ``w`` takes
  ``todo[r::w]``. Every rank reads the same final CSV after a barrier, so all agree on ``todo``.

A 2-process run therefore produces the same final CSV as a 1-process run, apart from timing columns.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from accelerate import PartialState

from ..files import atomic_write


@dataclass
class Shard:
    """This process's place among the launched processes (rank 0 of 1 when not launched)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    state: object | None = None  # accelerate.PartialState when accelerate is installed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def take(self, items: Sequence) -> list:
        """This rank's share: every ``world``-th item starting at ``rank`` (balanced, deterministic)."""
        return list(items[self.rank :: self.world])

    def barrier(self) -> None:
        if self.state is not None and self.world > 1:
            self.state.wait_for_everyone()

    @property
    def tag(self) -> str:
        return f"[rank {self.rank}/{self.world}]"


def init_shard(device: str = "auto", timeout_hours: float = 48.0) -> Shard:
    """Join the processes started by ``accelerate launch`` (or run alone).

    ``PartialState(cpu=True)`` is used when no CUDA GPU is visible or ``device == "cpu"``: then a
    ``--multi_gpu --num_processes N`` launch on a CPU-only machine becomes N gloo processes.
    ``timeout_hours`` bounds the final barrier, where fast ranks wait for slow ones (PIE-Bench
    shards take hours; torch's default of 30 minutes would abort the run).
    """
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu, timeout=timedelta(hours=timeout_hours))
    dev = str(state.device) if device == "auto" or state.num_processes > 1 else device
    if dev == "cpu:0":
        dev = "cpu"
    return Shard(state.process_index, state.num_processes, dev, state)


# ----------------------------------------------------------------------------- crash-safe CSV files
def read_rows(path: Path) -> list[dict]:
    """Rows of a CSV written by ``RowLog``; a missing file is empty, a torn last line is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # drop the partial row of an interrupted write
    return list(csv.DictReader(io.StringIO(text, newline="")))


def _csv_line(values: Iterable) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(list(values))
    return buf.getvalue()


class RowLog:
    """Append-only CSV: one complete row per write, flushed and fsynced before ``append`` returns."""

    def __init__(self, path: Path, columns: Sequence[str]):
        self.path = Path(path)
        self.columns = list(columns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):  # torn row from a killed process: cut it off
                with self.path.open("r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        if not self.path.is_file() or self.path.stat().st_size == 0:
            self._write(_csv_line(self.columns))

    def _write(self, line: str) -> None:
        with self.path.open("a", encoding="utf-8", newline="") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def append(self, row: dict) -> None:
        self._write(_csv_line(row.get(c, "") for c in self.columns))


def write_csv_atomic(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8", newline="") as f:
            f.write(_csv_line(columns))
            for row in rows:
                f.write(_csv_line(row.get(c, "") for c in columns))
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def part_path(parts_dir: Path, name: str, rank: int) -> Path:
    return Path(parts_dir) / f"{name}.rank{rank}.csv"


def merge_parts(final: Path, parts_dir: Path, name: str, columns: Sequence[str],
                key: Callable[[dict], tuple], sort_key: Callable[[dict], tuple] | None = None) -> list[dict]:
    """Fold every ``<name>.rank*.csv`` under ``parts_dir`` into ``final`` (atomically) and delete them.

    Rows already in ``final`` win over duplicates in the parts. Returns the merged rows.
    """
    final, parts_dir = Path(final), Path(parts_dir)
    parts = sorted(parts_dir.glob(f"{name}.rank*.csv")) if parts_dir.is_dir() else []
    rows = read_rows(final)
    if not parts and final.is_file():
        return rows
    seen = {key(r) for r in rows}
    for part in parts:
        for r in read_rows(part):
            k = key(r)
            if k not in seen:
                seen.add(k)
                rows.append(r)
    rows.sort(key=sort_key or key)
    write_csv_atomic(final, rows, columns)
    for part in parts:
        part.unlink()
    try:
        parts_dir.rmdir()  # only when empty
    except OSError:
        pass
    return rows


def resume(shard: Shard, final: Path, parts_dir: Path, name: str, columns: Sequence[str],
           key: Callable[[dict], tuple]) -> set:
    """Start or resume a sharded run: the main process folds an interrupted run's parts into ``final``,
    every process waits for it, and all get the keys of the rows already done."""
    if shard.is_main:
        Path(final).parent.mkdir(parents=True, exist_ok=True)
        merge_parts(final, parts_dir, name, columns, key)
    shard.barrier()
    return {key(r) for r in read_rows(final)}

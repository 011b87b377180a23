"""Load test of the web demo as a shared service: the server on 127.0.0.1, N concurrent sessions.

    nice -n 10 python benchmarks/demo_load.py --sessions 6 --duration 90 --out results/demo_load.json

Starts ``python -m stylediffusion.app`` (test-bed model, CPU, a fresh ``--cache_dir`` with a small
``--cache_max_mb``, ``--auth``) on 127.0.0.1 only and drives it with Gradio's own client
(``gradio_client``) from N sessions at once, each its own client (own session), for a bounded time and
a bounded number of requests; it stops by itself and stops the server. The sessions mix:

- inversions of their own picture (a test-bed scene with one pixel changed per session, so each
  session's inversion is its own) and edits of it to their own target; every edit's ``edit.json``
  download must name the session's own T and target ("every session got its own result");
- hostile requests (limits exceeded, a 100 kB literal, a decompression bomb, a text file as the
  image, NaN τ, ...): each must be refused with one line;
- cancellations: a long inversion submitted, then the session's Cancel;
- one session that runs long inversions while another times cached edits (their latency while a
  long inversion holds the model);
- a flood at the end: more requests at once than ``--max_queue`` admits.

Outcomes: *served*, *refused with a line* (Gradio's error with one line of text), *cancelled*, and
*failed* (anything else: a wrong result, an error without our line, a multi-line message, a client
exception). A sampler records the server's resident memory and the cache folder's size every 0.5 s.
``run_load`` is also called by ``tests/test_app_service.py`` (short, in-process server).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENE = ROOT / "data" / "images" / "testbed_red_triangle.png"
PROMPT = "a large red triangle on a gray background"
TARGETS = ["a large blue triangle on a gray background", "a large red circle on a gray background"]
BLENDS = ["triangle triangle", "triangle circle"]
AUTH = ("visitor", "load-test-password")
# The long inversion: ~370 training iterations, 10-20 s on the test bed (CPU), an entry of ~5 MB.
LONG_T, LONG_K = 20, 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique_scene(folder: Path, number: int) -> Path:
    """The test-bed scene with one pixel set from ``number``: another picture, so another inversion."""
    from PIL import Image

    path = folder / f"scene_{number}.png"
    with Image.open(SCENE) as img:
        img = img.convert("RGB")
    img.putpixel((number % 7, 31 - number // 7 % 7), (number * 37 % 256, number * 91 % 256, 11))
    img.save(path)
    return path


def bomb_png(path: Path, side: int = 100_000) -> Path:
    """A PNG whose header claims side x side pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


def edit_args(image, T: int, targets: str, blend: str = "", reweight: str = "", tau_v=0.5, K: int = 2):
    return (image, PROMPT, "stylediffusion", T, K, targets, "auto", tau_v, 0.6, 0.6, 0.0, blend, reweight, "p2p")


def hostile_requests(folder: Path, handle_file) -> list[tuple[str, str, tuple]]:
    """(name, endpoint, arguments) of requests a hostile visitor sends; each must be refused with one line."""
    scene = handle_file(str(SCENE))
    text_file = folder / "not_an_image.png"
    text_file.write_text("this is not a picture\n")
    return [
        ("T=1000, K=1000", "/invert", (scene, PROMPT, "stylediffusion", 1000, 1000)),
        ("K=10^7", "/invert", (scene, PROMPT, "stylediffusion", 4, 10**7)),
        ("Null-text at T=1000", "/invert", (scene, PROMPT, "nulltext", 1000, 1)),
        ("T as text", "/invert", (scene, PROMPT, "stylediffusion", "30; rm -rf /", 2)),
        ("5 000-character prompt", "/invert", (scene, "a " * 2500, "stylediffusion", 4, 2)),
        ("decompression bomb", "/invert", (handle_file(str(bomb_png(folder / "bomb.png"))), PROMPT,
                                           "stylediffusion", 4, 2)),
        ("text file as image", "/invert", (handle_file(str(text_file)), PROMPT, "stylediffusion", 4, 2)),
        ("10 000 targets", "/edit", edit_args(scene, 4, "\n".join([TARGETS[0]] * 10_000))),
        ("100 kB unary-minus literal", "/edit",
         edit_args(scene, 4, TARGETS[0], reweight="{'words': ['blue'], 'values': [" + "-" * 100_000 + "2]}")),
        ("5 000 '~'", "/edit", edit_args(scene, 4, TARGETS[0], reweight="{'words': ['blue'], 'values': ["
                                         + "~" * 5000 + "2]}")),
        ("tau_v NaN", "/edit", edit_args(scene, 4, TARGETS[0], tau_v="nan")),
        ("three blend words", "/edit", edit_args(scene, 4, TARGETS[0], blend="a b c")),
    ]


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.rows: list[dict] = []

    def add(self, session: int, kind: str, outcome: str, seconds: float, detail: str = "", start: float = 0.0):
        with self.lock:
            self.rows.append({"session": session, "kind": kind, "outcome": outcome, "seconds": round(seconds, 3),
                              "detail": detail[:300], "start": round(start, 3)})


def _message(err) -> str:
    return str(err.args[0] if getattr(err, "args", None) else err)


def _is_one_line(text: str) -> bool:
    return bool(text.strip()) and "\n" not in text.strip() and "Traceback" not in text and text.strip() != "Error"


def call(tally: Tally, session: int, kind: str, client, endpoint: str, args: tuple, t0: float,
         check=None, expect_refusal: bool = False):
    """One request: its outcome (served / refused / failed) and time go to the tally; returns the result."""
    from gradio_client.exceptions import AppError

    start = time.perf_counter()
    try:
        result = client.predict(*args, api_name=endpoint)
    except AppError as err:
        message = _message(err)
        outcome = "refused" if _is_one_line(message) else "failed"
        tally.add(session, kind, outcome, time.perf_counter() - start, message, start - t0)
        return None
    except Exception as err:  # noqa: BLE001 - a load test counts every way a request can go wrong
        tally.add(session, kind, "failed", time.perf_counter() - start, f"{type(err).__name__}: {err}", start - t0)
        return None
    problem = "served a hostile request" if expect_refusal else (check(result) if check else None)
    tally.add(session, kind, "failed" if problem else "served", time.perf_counter() - start, problem or "",
              start - t0)
    return result


def own_result(T: int, target: str):
    """The edit's download edit_0.json names this session's T and target, or the problem."""
    def check(result):
        jsons = [p for p in result[3] if str(p).endswith(".json")]
        if not jsons:
            return "no edit.json in the downloads"
        report = json.loads(Path(jsons[0]).read_text())
        if report.get("num_ddim_steps") != T or report.get("target") != target:
            return f"another session's result: T={report.get('num_ddim_steps')}, target={report.get('target')!r}"
        return None
    return check


def session_loop(index: int, url: str, folder: Path, tally: Tally, deadline: float, max_requests: int,
                 auth, t0: float, seed: int, role: str, events: dict, long_steps: tuple[int, int]):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    rng = random.Random(seed + index)
    work = folder / f"session_{index}"
    work.mkdir(parents=True, exist_ok=True)
    client = Client(url, auth=auth, verbose=False, download_files=str(work))
    T = 3 + index  # this session's T: its edits' edit.json must say it
    scene = handle_file(str(unique_scene(work, index)))
    hostile = hostile_requests(work, handle_file)
    requests = 0

    def invert_own():
        return call(tally, index, "invert", client, "/invert", (scene, PROMPT, "stylediffusion", T, 2), t0,
                    check=lambda r: None if f"T={T}," in r[2] else f"summary of another inversion: {r[2][:80]}")

    invert_own()
    requests += 1
    serial = 1000 * (index + 1)
    serial_hostile = [0]
    while requests == 1 or (time.monotonic() < deadline and requests < max_requests):  # one action at least
        requests += 1
        if role == "long":
            # long inversions of new pictures, one after another: the model is busy most of the time
            serial += 1
            picture = handle_file(str(unique_scene(work, serial)))
            events.setdefault("long", []).append([time.perf_counter() - t0, None])
            call(tally, index, "long invert", client, "/invert", (picture, PROMPT, "stylediffusion", *long_steps), t0)
            events["long"][-1][1] = time.perf_counter() - t0
            continue
        if role == "probe":
            k = rng.randrange(2)
            call(tally, index, "cached edit", client, "/edit", edit_args(scene, T, TARGETS[k], BLENDS[k]), t0,
                 check=own_result(T, TARGETS[k]))
            time.sleep(0.5)
            continue
        action = rng.choices(["edit", "hostile", "cancel", "invert"], weights=[4, 4, 2, 1])[0]
        if action == "edit":
            k = rng.randrange(2)
            call(tally, index, "edit", client, "/edit", edit_args(scene, T, TARGETS[k], BLENDS[k]), t0,
                 check=own_result(T, TARGETS[k]))
        elif action == "invert":
            invert_own()  # from the cache unless it was evicted
        elif action == "hostile":
            name, endpoint, args = hostile[(index + serial_hostile[0]) % len(hostile)]  # each kind in turn
            serial_hostile[0] += 1
            call(tally, index, f"hostile: {name}", client, endpoint, args, t0, expect_refusal=True)
        else:
            serial += 1
            picture = handle_file(str(unique_scene(work, serial)))
            start = time.perf_counter()
            job = client.submit(picture, PROMPT, "stylediffusion", *long_steps, api_name="/invert")
            time.sleep(rng.uniform(0.5, 2.0))
            # What the page's Cancel button does: Gradio's cancels (drops the event, queued or running) and
            # the demo's own cancel (stops the session's running request at its next model call).
            dropped = job.cancel()
            answer = client.predict(api_name="/cancel")
            try:
                job.result(timeout=120)
                outcome, detail = "served", "finished before the cancel reached it"
            except AppError as err:
                detail = _message(err)
                outcome = "cancelled" if detail.startswith("cancelled") else \
                    "refused" if _is_one_line(detail) else "failed"
            except Exception as err:  # noqa: BLE001 - a job Gradio cancelled ends client-side without data
                cancelled = dropped or job.status().code.name == "CANCELLED"
                outcome = "cancelled" if cancelled else "failed"
                detail = f"Gradio cancelled it ({type(err).__name__}); the demo answered: {answer}" if cancelled \
                    else f"{type(err).__name__}: {err}"
            tally.add(index, "cancel", outcome, time.perf_counter() - start, detail, start - t0)


def flood(url: str, folder: Path, tally: Tally, auth, t0: float, count: int):
    """``count`` requests at once from one session (more than the queue admits): each served or refused."""
    from gradio_client import Client, handle_file

    client = Client(url, auth=auth, verbose=False, download_files=str(folder))
    scene = handle_file(str(SCENE))
    jobs = [(time.perf_counter(), client.submit(scene, PROMPT, "stylediffusion", 3, 2, api_name="/invert"))
            for _ in range(count)]
    for start, job in jobs:
        try:
            job.result(timeout=300)
            tally.add(-1, "flood", "served", time.perf_counter() - start, "", start - t0)
        except Exception as err:  # noqa: BLE001
            message = _message(err)
            outcome = "refused" if _is_one_line(message) and ("queue" in message.lower() or "limit" in message) \
                else "failed"
            tally.add(-1, "flood", outcome, time.perf_counter() - start, f"{type(err).__name__}: {message}",
                      start - t0)


def folder_bytes(folder: Path) -> int:
    total = 0
    for base, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.stat(os.path.join(base, name)).st_size
            except OSError:
                pass
    return total


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run_load(url: str, cache_dir: Path, server_pid: int, sessions: int = 4, duration_s: float = 60.0,
             max_requests: int = 40, auth=AUTH, flood_count: int = 0, seed: int = 0,
             workdir: Path | None = None, long_steps: tuple[int, int] = (LONG_T, LONG_K)) -> dict:
    """Drive the server at ``url`` (on this machine) from ``sessions`` concurrent sessions; the summary."""
    from stylediffusion.demo_cache import BoundedCache

    workdir = Path(workdir or tempfile.mkdtemp(prefix="demo_load_"))
    tally, events, samples = Tally(), {}, []
    t0 = time.perf_counter()
    deadline = time.monotonic() + duration_s
    stop = threading.Event()

    def sample():
        store = BoundedCache(cache_dir, 0)
        while not stop.is_set():
            samples.append({"t": round(time.perf_counter() - t0, 2), "rss_mb": round(rss_mb(server_pid), 1),
                            "cache_mb": round(store.size() / 2**20, 3)})
            stop.wait(0.5)

    roles = ["long", "probe"] + ["mixed"] * max(0, sessions - 2) if sessions >= 3 else ["mixed"] * sessions
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=session_loop, args=(k, url, workdir, tally, deadline, max_requests, auth,
                                                           t0, seed, role, events, long_steps), daemon=True)
               for k, role in enumerate(roles)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=duration_s + 300)
    hung = sum(thread.is_alive() for thread in threads)
    if flood_count:
        flood(url, workdir, tally, auth, t0, flood_count)
    stop.set()
    sampler.join()
    return summarise(tally.rows, events, samples, hung, time.perf_counter() - t0)


def summarise(rows, events, samples, hung, seconds) -> dict:
    outcomes = {}
    for row in rows:
        outcomes[row["outcome"]] = outcomes.get(row["outcome"], 0) + 1
    by_kind = {}
    for row in rows:
        kind = row["kind"].split(":")[0]
        by_kind.setdefault(kind, {}).setdefault(row["outcome"], 0)
        by_kind[kind][row["outcome"]] += 1
    windows = [w for w in events.get("long", []) if w[1] is not None]
    during = [r["seconds"] for r in rows if r["kind"] == "cached edit" and r["outcome"] == "served"
              and any(a <= r["start"] <= b for a, b in windows)]
    alone = [r["seconds"] for r in rows if r["kind"] in ("cached edit", "edit") and r["outcome"] == "served"
             and not any(a <= r["start"] <= b for a, b in windows)]

    def stats(values):
        return {"n": len(values), "median_s": round(statistics.median(values), 2) if values else None,
                "max_s": round(max(values), 2) if values else None}

    return {"seconds": round(seconds, 1), "requests": len(rows), "outcomes": outcomes, "by_kind": by_kind,
            "hung_sessions": hung,
            "cached_edit_latency_during_long_inversion": stats(during),
            "edit_latency_otherwise": stats(alone),
            "long_inversions": len(windows),
            "rss_mb": {"min": min((s["rss_mb"] for s in samples), default=None),
                       "max": max((s["rss_mb"] for s in samples), default=None)},
            "cache_mb": {"max": max((s["cache_mb"] for s in samples), default=None),
                         "last": samples[-1]["cache_mb"] if samples else None},
            "samples": samples, "rows": rows, "failures": [r for r in rows if r["outcome"] == "failed"],
            "refusals": sorted({r["detail"] for r in rows if r["outcome"] == "refused"})}


def plot(summary: dict, path: Path) -> None:
    """The server's memory and the cache folder's size over the run, with the cache's bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in summary["samples"]]
    fig, (mem, disk) = plt.subplots(2, 1, figsize=(7, 4.5), sharex=True)
    mem.plot(t, [s["rss_mb"] for s in summary["samples"]], color="tab:blue")
    mem.set_ylabel("server RSS (MB)")
    disk.plot(t, [s["cache_mb"] for s in summary["samples"]], color="tab:green", label="--cache_dir")
    disk.axhline(summary["cache_max_mb"], color="tab:red", linestyle="--", label="--cache_max_mb")
    disk.set_ylabel("cache (MB)")
    disk.set_xlabel("seconds into the run")
    disk.legend(loc="lower right")
    mem.set_title(f"demo under load: {summary['sessions']} sessions, {summary['requests']} requests")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def worst_case(methods=("stylediffusion", "nulltext", "spdinv", "directinv")) -> dict:
    """Seconds of the largest request the default limits admit, per inversion method (T = max_steps,
    K = max_inner_steps), and of an edit to max_targets targets at T = max_steps, through ``DemoApp`` on
    the test-bed model (CPU) with the default time budget: each must finish, not be stopped."""
    import torch
    from PIL import Image

    from stylediffusion import StyleDiffusionEditor
    from stylediffusion.app import DemoApp
    from stylediffusion.demo_limits import ServiceLimits

    torch.set_num_threads(1)
    limits = ServiceLimits()
    editor = StyleDiffusionEditor.from_pretrained("testbed", device="cpu", progress=False)
    app = DemoApp(editor, Path(tempfile.mkdtemp(prefix="demo_worst_")), limits=limits)
    with Image.open(SCENE) as img:
        scene = img.convert("RGB")
    rows = {}
    for method in methods:
        start = time.perf_counter()
        try:
            app.invert(scene, PROMPT, method, limits.max_steps, limits.max_inner_steps)
            rows[f"invert {method}"] = round(time.perf_counter() - start, 1)
        except Exception as err:  # noqa: BLE001 - reported, not hidden
            rows[f"invert {method}"] = f"{type(err).__name__}: {err}"
        print(rows, flush=True)
    inverted = next((m for m in methods if isinstance(rows[f"invert {m}"], float)), None)
    if inverted is None:  # every inversion was stopped: edit a DDIM inversion at the largest T
        inverted = "ddim"
        app.invert(scene, PROMPT, inverted, limits.max_steps, limits.max_inner_steps)
    targets = "\n".join((TARGETS * limits.max_targets)[:limits.max_targets])
    start = time.perf_counter()
    app.edit(scene, PROMPT, inverted, limits.max_steps, limits.max_inner_steps, targets)
    rows[f"edit of the {inverted} inversion, {limits.max_targets} targets"] = round(time.perf_counter() - start, 1)
    shutil.rmtree(app.cache_dir, ignore_errors=True)
    return {"T": limits.max_steps, "K": limits.max_inner_steps, "max_seconds": limits.max_seconds, "seconds": rows}


def start_server(port: int, cache_dir: Path, cache_max_mb: float, max_seconds: float, max_queue: int,
                 log: Path) -> subprocess.Popen:
    """``python -m stylediffusion.app`` on 127.0.0.1 (never another address), test-bed model, CPU."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "stylediffusion.app", "--model", "testbed", "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(port), "--cache_dir", str(cache_dir),
               "--cache_max_mb", str(cache_max_mb), "--max_seconds", str(max_seconds),
               "--max_queue", str(max_queue), "--auth", f"{AUTH[0]}:{AUTH[1]}"]
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)


def wait_until_serving(url: str, process: subprocess.Popen, timeout: float = 180.0) -> None:
    import urllib.request

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the server did not answer within {timeout:.0f} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=6)
    p.add_argument("--duration", type=float, default=90.0, help="seconds the sessions send requests")
    p.add_argument("--max_requests", type=int, default=60, help="per session")
    p.add_argument("--cache_max_mb", type=float, default=16.0)
    p.add_argument("--max_seconds", type=float, default=30.0)
    p.add_argument("--max_queue", type=int, default=8)
    p.add_argument("--flood", type=int, default=20, help="requests sent at once at the end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep the work folder (server log, cache)")
    p.add_argument("--plot", type=Path, default=None, help="PNG of memory and cache size over the run")
    p.add_argument("--worst_case", action="store_true",
                   help="instead: time the largest request the default limits admit, per method")
    args = p.parse_args(argv)
    if args.worst_case:
        result = worst_case()
        print(json.dumps(result, indent=2))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    args.sessions = max(1, min(args.sessions, 16))  # bounded: this is a load test of one machine, not a flood tool
    args.duration = max(5.0, min(args.duration, 600.0))
    work = Path(tempfile.mkdtemp(prefix="demo_load_"))
    cache_dir, port = work / "cache", free_port()
    server = start_server(port, cache_dir, args.cache_max_mb, args.max_seconds, args.max_queue, work / "server.log")
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_serving(url, server)
        summary = run_load(url, cache_dir, server.pid, args.sessions, args.duration, args.max_requests,
                           flood_count=args.flood, seed=args.seed, workdir=work)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    log_text = (work / "server.log").read_text(errors="replace")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    summary.update({"sessions": args.sessions, "cache_max_mb": args.cache_max_mb, "max_seconds": args.max_seconds,
                    "max_queue": args.max_queue, "server_log_tracebacks": log_text.count("Traceback"),
                    "server_tracebacks": [block[-3000:] for block in log_text.split("Traceback")[1:4]],
                    "server_log_token_warnings": log_text.count("Token indices sequence length")})
    printable = {k: v for k, v in summary.items() if k not in ("samples", "rows")}
    print(json.dumps(printable, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    if args.plot:
        plot(summary, args.plot)
    return 0 if not summary["failures"] and not summary["hung_sessions"] else 1


if __name__ == "__main__":
    sys.exit(main())

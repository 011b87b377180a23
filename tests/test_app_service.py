"""The web demo as a shared service (issue 26), through ``DemoApp``'s own methods (the page calls the same
ones) on the test-bed model: the hostile cases table, the operator's limits, the time budget and the
visitor's cancel, the bounded cache folder, a full disk, ``--auth``, and a short load test of the real
server driven by Gradio's client from concurrent sessions (``benchmarks/demo_load.py``)."""
from __future__ import annotations

import errno
import importlib.util
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stylediffusion.app import DemoApp, access_warning, build_parser, read_auth
from stylediffusion.demo_cache import BoundedCache
from stylediffusion.demo_limits import RequestStopped, ServiceLimits
from stylediffusion.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SCENE = ROOT / "data" / "images" / "testbed_red_triangle.png"
PROMPT = "a large red triangle on a gray background"
BLUE = "a large blue triangle on a gray background"
T, K = 4, 2
WORKS = "works"


def scene(mode: str | None = None) -> Image.Image:
    with Image.open(SCENE) as img:
        img.load()
    return img if mode is None else img.convert(mode)


def header_only_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height pixels and holds none."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


def float_image() -> Image.Image:
    """Mode F (32-bit float), 40x24: neither 8-bit nor square."""
    values = np.linspace(0, 1, 40 * 24, dtype=np.float32).reshape(24, 40)
    return Image.fromarray(values, mode="F")


@pytest.fixture(scope="module")
def editor(testbed_editor):
    return testbed_editor


@pytest.fixture(scope="module")
def app(editor, tmp_path_factory):
    demo = DemoApp(editor, tmp_path_factory.mktemp("service_cache"))
    demo.invert(scene(), PROMPT, "stylediffusion", T, K)
    return demo


def invert(**change):
    return "invert", {"image": scene(), "prompt": PROMPT, "method": "stylediffusion", "num_inference_steps": T,
                      "num_inner_steps": K, **change}


def edit(**change):
    return "edit", {"image": scene(), "prompt": PROMPT, "method": "stylediffusion", "num_inference_steps": T,
                    "num_inner_steps": K, "targets": BLUE, **change}


REWEIGHT = "{'words': ['blue'], 'values': [%s2]}"
# The hostile visitor's 23 cases (issue 26): each is refused with one line containing the text given (a
# limit names its flag), or works within its limit. The first six broke the one-line promise before.
CASES = [
    ("re-weighting: 100 kB literal of nested unary minus", edit(reweight=REWEIGHT % ("-" * 100_000)),
     "re-weighting of target words is 100"),
    ("re-weighting: 5 000 '~'", edit(reweight=REWEIGHT % ("~" * 5000)), "is not a literal"),
    ("10 000 target lines", edit(targets="\n".join([BLUE] * 10_000)), "--max_targets"),
    ("K = 10^7", invert(num_inner_steps=10**7), "--max_inner_steps"),
    ("T = 1000 with K = 1000", invert(num_inference_steps=1000, num_inner_steps=1000), "--max_steps"),
    ("Null-text at T = 1000", invert(method="nulltext", num_inference_steps=1000, num_inner_steps=1), "--max_steps"),
    ("re-weighting words None", edit(reweight="{'words': None, 'values': {}}"), "are not a word"),
    ("re-weighting factor inf", edit(reweight="blue=inf"), "must be a finite number"),
    ("T as text", invert(num_inference_steps="30; rm -rf /"), "whole numbers"),
    ("T infinite", invert(num_inference_steps=float("inf")), "whole numbers"),
    ("5 000-character prompt", invert(prompt="a " * 2500), "--max_prompt_chars"),
    ("prompt over the encoder's 77 tokens", invert(prompt="a red " * 40), "tokens long"),
    ("target with a control character", edit(targets="a large blue\x07 triangle"), "control character"),
    ("tau_v NaN", edit(tau_v=float("nan")), "τ_v (learned values) = nan is outside [0, 1]"),
    ("tau_c as text", edit(tau_c="0.6"), "τ_c (cross-attention) = '0.6' is outside [0, 1]"),
    ("three blend words", edit(blend_words="triangle big triangle"), "needs two words"),
    ("edit type not offered", edit(edit_type="Replacement; DROP TABLE"), "is not one of"),
    ("inversion method a list", invert(method=["stylediffusion"]), "not one of the names"),
    ("decompression bomb (100 000 x 100 000 header)", invert(image="BOMB"), "--max_image_pixels"),
    ("5 000 x 5 000 image, over --max_image_pixels", invert(image="BIG"), "--max_image_pixels"),
    ("text file as the image", invert(image="TEXT"), "cannot be read as a picture"),
    ("CMYK image", invert(image=scene("CMYK"), num_inference_steps=2, num_inner_steps=1), WORKS),
    ("32-bit float image, not square", invert(image=float_image(), num_inference_steps=2, num_inner_steps=1), WORKS),
]


@pytest.fixture()
def library_log():
    """What transformers logs (its console warnings go through its logger, whatever stream pytest set)."""
    import logging

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("name, call, expected", CASES, ids=[c[0] for c in CASES])
def test_hostile_page_input(app, tmp_path, capfd, library_log, name, call, expected):
    method, kwargs = call
    image = kwargs.get("image")
    if image == "BOMB":
        kwargs["image"] = {"path": str(header_only_png(tmp_path / "bomb.png", 100_000, 100_000))}  # Gradio's record
    elif image == "BIG":
        kwargs["image"] = str(header_only_png(tmp_path / "big.png", 5000, 5000))
    elif image == "TEXT":
        (tmp_path / "upload.png").write_text("not a picture\n")
        kwargs["image"] = {"path": str(tmp_path / "upload.png")}
    # transformers warns once per tokenizer: forget an earlier warning, so this case can see a new one
    app.editor.bundle.tokenizer.deprecation_warnings.clear()
    capfd.readouterr()
    before = _files(app.cache_dir)
    if expected == WORKS:
        result = getattr(app, method)(**kwargs)
        assert result.reconstruction.size == (32, 32)
    else:
        started = time.perf_counter()
        with pytest.raises(UserError) as err:
            getattr(app, method)(**kwargs)
        message = str(err.value)
        assert expected in message and "\n" not in message and "Traceback" not in message, message
        assert time.perf_counter() - started < 5  # refused before any work
        assert _files(app.cache_dir) == before  # nothing written
    out, errors = capfd.readouterr()
    # transformers' token-length warning stays off the server's console
    assert "Token indices" not in out + errors and not [r for r in library_log if "Token indices" in r.getMessage()]
    assert not app._running and not app._lock.locked()


def test_a_reload_with_a_forged_key_finds_nothing(app):
    for key in (None, "", 5, {"path": "/etc/passwd"}, ["a"], "../" * 8, "0" * 23 + "g"):
        assert app.cached(key) is None


def test_case_table_has_the_23_cases():
    assert len(CASES) == 23 and len({c[0] for c in CASES}) == 23


def test_limits_are_the_operators(app, editor, tmp_path):
    strict = DemoApp(editor, tmp_path, limits=ServiceLimits(max_steps=3, max_inner_steps=1, max_targets=1,
                                                            max_prompt_chars=50))
    for call, flag in (
        (lambda: strict.invert(scene(), PROMPT, "stylediffusion", 4, 1), "--max_steps"),
        (lambda: strict.invert(scene(), PROMPT, "stylediffusion", 3, 2), "--max_inner_steps"),
        (lambda: strict.edit(scene(), PROMPT, "stylediffusion", 3, 1, f"{BLUE}\n{BLUE}"), "--max_targets"),
        (
            lambda: strict.invert(scene(), PROMPT + " and twenty more characters", "stylediffusion", 3, 1),
            "--max_prompt_chars",
        ),
    ):
        with pytest.raises(UserError, match=flag):
            call()
    assert "limit of 3" in str(pytest.raises(UserError, strict.invert, scene(), PROMPT, "stylediffusion", 4, 1).value)


def test_time_budget_stops_a_running_request_and_frees_the_model(app, editor, tmp_path):
    from stylediffusion import Inversion

    hurried = DemoApp(editor, tmp_path, limits=ServiceLimits(max_seconds=0.3))
    started = time.perf_counter()
    with pytest.raises(RequestStopped, match="--max_seconds") as err:
        hurried.invert(scene(), PROMPT, "stylediffusion", 30, 100)
    assert time.perf_counter() - started < 5 and "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())  # nothing kept
    assert not hurried._lock.locked() and not hurried._running
    # The model is free and unchanged: the next edit is the API's edit, pixel for pixel.
    key = app.cache_key(scene(), PROMPT, "stylediffusion", T, K)
    result = app.edit(scene(), PROMPT, "stylediffusion", T, K, BLUE)
    direct = editor.edit(Inversion.load(app.cache_dir / f"{key}.safetensors"), BLUE, progress=False)
    assert np.array_equal(np.asarray(direct.images[0]), np.asarray(result.edits[0][0]))


def test_a_visitor_cancels_their_own_request(editor, tmp_path):
    demo = DemoApp(editor, tmp_path)
    outcome = {}

    def visitor():
        try:
            demo.invert(scene(), PROMPT, "stylediffusion", 30, 100, session="visitor-a")
        except UserError as err:
            outcome["line"] = str(err)

    thread = threading.Thread(target=visitor)
    thread.start()
    for _ in range(200):  # until it holds the model
        guards = demo._running.get("visitor-a", [])
        if guards and guards[0].deadline is not None:
            break
        time.sleep(0.02)
    assert demo.cancel("visitor-b") == "nothing of yours is running."  # another visitor cannot stop it
    started = time.perf_counter()
    assert demo.cancel("visitor-a").startswith("cancelling")
    thread.join(timeout=10)
    assert not thread.is_alive() and time.perf_counter() - started < 5
    assert outcome["line"].startswith("cancelled:") and not demo._lock.locked()
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]


def _entry(root: Path, key: str, size: int, age: float) -> None:
    for suffix, part in ((".safetensors", size - 10), (".demo.json", 10)):
        path = root / f"{key}{suffix}"
        path.write_bytes(b"x" * part)
        os.utime(path, (time.time() - age, time.time() - age))


def test_cache_evicts_least_recently_used_never_an_entry_in_use_and_across_restarts(tmp_path):
    keys = [f"{k:024x}" for k in range(5)]
    for k, key in enumerate(keys):  # keys[0] the oldest
        _entry(tmp_path, key, 1000, age=100 - k)
    (tmp_path / "edits" / "abc").mkdir(parents=True)
    (tmp_path / "edits" / "abc" / "edit_0.png").write_bytes(b"y" * 1000)
    (tmp_path / "README.txt").write_text("not the cache's")
    store = BoundedCache(tmp_path, 3500)
    store.pin(keys[0])  # in use by a session
    store.touch(keys[1])  # just used
    removed = store.make_room()
    assert removed == [keys[2], keys[3], keys[4]] and store.size() <= 3500
    assert (tmp_path / f"{keys[0]}.safetensors").exists() and (tmp_path / "README.txt").exists()
    # A restart with a smaller bound trims the folder before serving; other files are left alone.
    DemoApp(object(), tmp_path, cache_max_mb=1500 / 2**20)
    assert BoundedCache(tmp_path, 0).size() <= 1500 and (tmp_path / "README.txt").exists()


def test_a_session_keeps_its_inversion_while_others_fill_the_cache(editor, tmp_path, monkeypatch):
    demo = DemoApp(editor, tmp_path)
    pictures = []
    for k in range(3):
        picture = scene("RGB")
        picture.putpixel((0, 0), (k, 0, 0))
        pictures.append(picture)
    mine = demo.invert(pictures[0], PROMPT, "stylediffusion", 2, 1, session="a")
    demo.store.max_bytes = int(2.5 * demo.store.size())  # room for two inversions of this size, not three
    for picture in pictures[1:]:
        demo.invert(picture, PROMPT, "stylediffusion", 2, 1, session="b")
    assert demo.store.size() <= demo.store.max_bytes and len(demo.store.entries()) == 2
    assert demo.cached(mine.key) is not None  # the oldest, but session a's
    walks = []
    real_entries = type(demo.store).entries
    monkeypatch.setattr(type(demo.store), "entries", lambda store: walks.append(1) or real_entries(store))
    demo._keep("0" * 24, lambda: None)  # keeping one result walks the cache folder twice: before and after
    assert len(walks) == 2
    assert demo.edit(pictures[0], PROMPT, "stylediffusion", 2, 1, BLUE, session="a").edits


def test_full_disk_is_the_pages_one_line_and_leaves_nothing(editor, tmp_path, monkeypatch):
    from stylediffusion import files

    demo = DemoApp(editor, tmp_path)

    def disk_full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "replace", disk_full)
    with pytest.raises(UserError, match="disk is full") as err:
        demo.invert(scene("RGB"), PROMPT, "stylediffusion", 2, 1)
    assert "\n" not in str(err.value) and not list(tmp_path.iterdir())


def test_auth_flags_and_the_open_server_warning(tmp_path):
    assert read_auth(None, None) is None
    assert read_auth(["ann:secret:with:colons"], None) == [("ann", "secret:with:colons")]
    users = tmp_path / "users.txt"
    users.write_text("# who may use the demo\nann:one\n\nbob:two\n")
    assert read_auth(["cy:three"], users) == [("cy", "three"), ("ann", "one"), ("bob", "two")]
    for bad in (["no-colon"], [":password"], ["user:"]):
        with pytest.raises(UserError, match="USER:PASSWORD"):
            read_auth(bad, None)
    assert "without --auth" in access_warning("0.0.0.0", None)
    assert access_warning("127.0.0.1", None) is None and access_warning("0.0.0.0", [("a", "b")]) is None
    args = build_parser().parse_args([])
    limits = ServiceLimits()
    assert (args.max_steps, args.max_inner_steps, args.max_targets, args.max_seconds) == \
        (limits.max_steps, limits.max_inner_steps, limits.max_targets, limits.max_seconds)
    with pytest.raises(SystemExit) as code:
        build_parser().parse_args(["--max_steps", "0"])
    assert code.value.code == 2


def _load_module():
    spec = importlib.util.spec_from_file_location("demo_load", ROOT / "benchmarks" / "demo_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_load_through_gradios_client(editor, tmp_path):
    """The load test, short: the real server (in this process, 127.0.0.1), 3 sessions of Gradio's client."""
    pytest.importorskip("gradio_client")
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    from stylediffusion.app import serve

    load = _load_module()
    bound_mb = 6.0
    demo = DemoApp(editor, tmp_path / "cache", limits=ServiceLimits(max_seconds=20), cache_max_mb=bound_mb)
    port = load.free_port()
    page = serve(demo, "127.0.0.1", port, block=False, quiet=True, auth=[load.AUTH], max_queue=4)
    try:
        url = f"http://127.0.0.1:{port}/"
        with pytest.raises(AuthenticationError):  # no login, no page
            Client(url, verbose=False)
        summary = load.run_load(url, tmp_path / "cache", os.getpid(), sessions=3, duration_s=3, max_requests=3,
                                flood_count=6, workdir=tmp_path / "load", long_steps=(6, 4))
    finally:
        page.close()
    assert not summary["failures"] and not summary["hung_sessions"], summary["failures"]
    assert summary["outcomes"].get("served", 0) >= 5 and summary["outcomes"].get("refused", 0) >= 1
    assert summary["by_kind"]["cached edit"].get("served", 0) >= 1  # each checked to be its session's own
    assert summary["cache_mb"]["max"] <= bound_mb

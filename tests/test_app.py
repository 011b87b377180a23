"""The web demo's logic (``stylediffusion.app.DemoApp``) called directly, without a browser, on the
test-bed model with a small T/K: the on-disk inversion cache, several targets, and bad input."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stylediffusion.app import DemoApp, build_parser, image_digest, parse_blend_words, parse_reweight
from stylediffusion.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SCENE = ROOT / "data" / "images" / "testbed_red_triangle.png"
PROMPT = "a large red triangle on a gray background"
BLUE = "a large blue triangle on a gray background"
CIRCLE = "a large red circle on a gray background"
T, K = 4, 2


def scene() -> Image.Image:
    with Image.open(SCENE) as img:
        img.load()
        return img


@pytest.fixture(scope="module")
def editor():
    from stylediffusion import StyleDiffusionEditor

    return StyleDiffusionEditor.from_pretrained("testbed", device="cpu", progress=False)


@pytest.fixture(scope="module")
def inverted(editor, tmp_path_factory):
    app = DemoApp(editor, tmp_path_factory.mktemp("demo_cache"))
    return app, app.invert(scene(), PROMPT, "stylediffusion", T, K)


def test_second_invert_is_read_from_the_cache(inverted, editor, monkeypatch):
    from stylediffusion import Inversion

    app, first = inverted
    assert not first.cached
    # the test-bed model reconstructs its own scenes (v1 ~26 dB, v2 ~20 dB at T=4, K=2; an unrelated image ~10 dB)
    assert first.psnr > 15
    assert first.image.size == first.reconstruction.size == (32, 32)

    def no_training(*args, **kwargs):
        raise AssertionError("the cached inversion was trained again")

    monkeypatch.setattr(editor, "invert", no_training)
    again = app.invert(scene(), PROMPT, "stylediffusion", float(T), float(K))  # Gradio's numbers are floats
    assert again.cached and again.key == first.key and again.psnr == first.psnr
    # Another process (or browser tab) over the same folder sees it too, in the API's own file format.
    other = DemoApp(editor, app.cache_dir).invert(scene(), PROMPT, "stylediffusion", T, K)
    assert other.cached and other.key == first.key
    assert Inversion.load(app.cache_dir / f"{first.key}.safetensors").source == PROMPT
    assert np.array_equal(np.asarray(other.upload), np.asarray(scene()))  # what a page reload puts back


def test_cache_key_separates_pixels_prompt_and_settings(inverted):
    app, first = inverted
    assert app.cache_key(scene(), PROMPT, "stylediffusion", T, K) == first.key
    moved = scene().convert("RGB")
    moved.putpixel((0, 0), (0, 0, 0))
    others = {app.cache_key(moved, PROMPT, "stylediffusion", T, K),
              app.cache_key(scene(), BLUE, "stylediffusion", T, K),
              app.cache_key(scene(), PROMPT, "nulltext", T, K),
              app.cache_key(scene(), PROMPT, "stylediffusion", T + 1, K),
              app.cache_key(scene(), PROMPT, "stylediffusion", T, K + 1)}
    assert len(others) == 5 and first.key not in others
    assert image_digest(scene()) == image_digest(Image.open(SCENE))  # same pixels, same digest
    assert app.cached(None) is None and app.cached("../../etc/passwd") is None


def test_several_targets_give_a_row_matching_the_api(inverted, editor):
    app, first = inverted
    result = app.edit(scene(), PROMPT, "stylediffusion", T, K, f"{BLUE}\n{CIRCLE}\n",
                      blend_words="triangle triangle\ntriangle circle", tau_u=0.5)
    assert [target for _, target in result.edits] == [BLUE, CIRCLE]
    assert result.strip.width > 4 * 32 * 2  # input | reconstruction | two edits, enlarged for the eye
    assert isinstance(result.attention_maps, Image.Image)
    assert [p.name for p in result.files] == ["edit_0.png", "edit_0.json", "edit_1.png", "edit_1.json"]
    report = json.loads(result.files[3].read_text())
    assert report["target"] == CIRCLE and report["blend_words"] == ["triangle", "circle"]
    assert report["edit_type"] == "Replacement" and report["tau_u"] == 0.5 and report["num_ddim_steps"] == T
    # The page's edit is the API's edit with the same settings, pixel for pixel.
    from stylediffusion import Inversion

    inv = Inversion.load(app.cache_dir / f"{first.key}.safetensors")
    direct = editor.edit(inv, CIRCLE, blend_words=("triangle", "circle"), tau_u=0.5, progress=False)
    assert np.array_equal(np.asarray(direct.images[0]), np.asarray(result.edits[1][0]))
    assert np.array_equal(np.asarray(Image.open(result.files[2])), np.asarray(result.edits[1][0]))
    assert not np.array_equal(np.asarray(result.edits[0][0]), np.asarray(result.edits[1][0]))


def test_two_sessions_editing_at_once_get_their_own_results(inverted):
    app, _ = inverted
    results = {}

    def session(target, blend):
        results[target] = app.edit(scene(), PROMPT, "stylediffusion", T, K, target, blend_words=blend)

    threads = [threading.Thread(target=session, args=(BLUE, "triangle triangle")),
               threading.Thread(target=session, args=(CIRCLE, "triangle circle"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [t for _, t in results[BLUE].edits] == [BLUE] and [t for _, t in results[CIRCLE].edits] == [CIRCLE]
    assert results[BLUE].files[0].parent != results[CIRCLE].files[0].parent


def _api_message(editor, app, key, **edit) -> str:
    from stylediffusion import Inversion

    inv = Inversion.load(app.cache_dir / f"{key}.safetensors")
    with pytest.raises(UserError) as err:
        editor.edit(inv, **edit)
    return str(err.value)


@pytest.mark.parametrize("edit, expected", [
    ({"targets": " \n"}, "edit needs a target prompt"),
    # blend word not in the prompt, and a Replacement whose word counts differ: the API's own words
    ({"targets": BLUE, "blend_words": "dog triangle"}, {"target": BLUE, "blend_words": ("dog", "triangle")}),
    ({"targets": "a large blue triangle", "edit_type": "Replacement"},
     {"target": "a large blue triangle", "edit_type": "Replacement"}),
    ({"targets": BLUE, "tau_v": 1.5}, "τ_v (learned values) = 1.5 is outside [0, 1]"),  # the field's label
    ({"targets": BLUE, "edit_method": "paint"}, "unknown edit method 'paint'"),
    ({"targets": BLUE, "reweight": "blue=lots"}, "not word=value"),
    ({"targets": BLUE, "blend_words": "triangle"}, "needs two words"),
    ({"targets": f"{BLUE}\n{CIRCLE}\n{BLUE}", "blend_words": "a a\nb b"}, "one line per target"),
])
def test_bad_edit_input_is_one_line(inverted, editor, edit, expected):
    app, first = inverted
    with pytest.raises(UserError) as err:
        app.edit(scene(), PROMPT, "stylediffusion", T, K, **edit)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    if isinstance(expected, dict):  # the same message as the API (and so the command line) gives
        assert message == _api_message(editor, app, first.key, **expected)
    else:
        assert expected in message


@pytest.mark.parametrize("args, expected", [
    ((None, PROMPT, "stylediffusion", T, K), "no image"),
    ((scene(), "", "stylediffusion", T, K), "source prompt"),
    ((scene(), PROMPT, "stylediffusion", 2.5, K), "whole numbers"),
    ((scene(), PROMPT, "stylediffusion", 0, K), "at least 1"),
    ((scene(), PROMPT, "nonesuch", T, K), "unknown inversion method 'nonesuch'"),
])
def test_bad_invert_input_is_one_line(inverted, args, expected):
    app, _ = inverted
    with pytest.raises(UserError, match=None) as err:
        app.invert(*args)
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert not list(app.cache_dir.glob("*.tmp"))  # nothing half-written


def test_edit_before_invert_says_press_invert(inverted):
    app, _ = inverted
    with pytest.raises(UserError, match="press Invert first"):
        app.edit(scene(), "a large red triangle on a blue background", "stylediffusion", T, K, BLUE)


def test_page_shows_user_errors_as_messages_and_keeps_bugs_as_bugs():
    gr = pytest.importorskip("gradio")
    from stylediffusion.app import page_errors

    @page_errors
    def bad_input(progress=None):
        raise UserError("tau_v = 1.5 is outside [0, 1]: it is a fraction of the DDIM steps.")

    @page_errors
    def bug():
        raise KeyError("internal")

    with pytest.raises(gr.Error) as err:
        bad_input()
    assert err.value.message == "tau_v = 1.5 is outside [0, 1]: it is a fraction of the DDIM steps."
    with pytest.raises(KeyError):
        bug()
    import inspect

    assert "progress" in inspect.signature(bad_input).parameters  # Gradio still sees the progress argument


def test_form_parsers():
    assert parse_reweight("red=2, blue=0.5") == {"words": ["red", "blue"], "values": [2.0, 0.5]}
    assert parse_reweight("{'words': ['red'], 'values': [2]}") == {"words": ["red"], "values": [2]}
    assert parse_reweight("  ") is None
    assert parse_blend_words("cat tiger", 2) == [("cat", "tiger"), ("cat", "tiger")]
    assert parse_blend_words("cat tiger\n-", 2) == [("cat", "tiger"), None]
    assert parse_blend_words("", 3) == [None, None, None]


def test_examples_put_the_test_bed_scenes_first_with_the_index_edits(editor, tmp_path):
    examples = DemoApp(editor, tmp_path).examples()
    path, prompt, targets, blend = examples[0]
    assert Path(path).name == "testbed_red_triangle.png" and prompt == PROMPT
    assert targets.splitlines() == ["a large green triangle on a gray background",  # case 10 of the index
                                    "a large red square on a gray background"]
    assert blend.splitlines() == ["triangle triangle", "triangle square"]
    for _, _, targets, blend in examples:  # a blend cell always fits its targets
        assert not blend or len(blend.splitlines()) == len(targets.splitlines())


def test_command_line_defaults_serve_the_test_bed_model_locally():
    args = build_parser().parse_args([])
    assert (args.model, args.host, args.device) == ("testbed", "127.0.0.1", "auto")
    args = build_parser().parse_args(["--model", "tiny", "--image_encoder", "enc", "--device", "cpu", "--port", "9"])
    assert (args.model, args.image_encoder, args.device, args.port) == ("tiny", "enc", "cpu", 9)

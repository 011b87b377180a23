"""One bad value through each surface: the message names the parameter as that caller spells it
(``specs.spelled``): ``--tau_v`` on the command line, ``tau_v=`` from Python, the field's label on the page."""
import pytest

from stylediffusion.bench import pie
from stylediffusion.cli import build_parser, main
from stylediffusion.editing import EditSpec
from stylediffusion.errors import UserError
from stylediffusion.specs import SETTINGS, asked_from, spelled
from stylediffusion.validate import edit_spec

SOURCE, TARGET = "a photo of a cat", "a photo of a dog"
# (the bad input as flags, the same as API keywords, what the CLI's line says, what the API's message says)
CASES = [
    (["--tau_v", "2"], {"tau_v": 2.0}, "--tau_v = 2.0 is outside [0, 1]", "tau_v=2.0 is outside [0, 1]"),
    (["--tau_c", "{'default_': 0.6, 'dog': 7}"], {"tau_c": {"default_": 0.6, "dog": 7}}, "--tau_c[dog] = 7",
     "tau_c[dog] = 7"),
    (["--edit_type", "Reweight"], {"edit_type": "Reweight"}, "needs --eq_params {'words'", "needs eq_params={'words'"),
    (["--edit_type", "Sideways"], {"edit_type": "Sideways"}, "argument --edit_type: invalid choice: 'Sideways'",
     "edit_type='Sideways' is not one of Replacement, Refinement, Reweight"),
    (["--edit", "sdedit", "--method_option", "sdedit_strength=5"], {"method": "sdedit", "sdedit_strength": 5},
     "--method_option sdedit_strength = 5 is above its maximum", "sdedit_strength=5 is above its maximum"),
    (["--method_option", "bogus=1"], {"bogus": 1}, "--method_option bogus is not an option of ddim + p2p",
     "bogus= is not an option of ddim + p2p"),
    (["--edit", "nope"], {"method": "nope"}, "unknown --edit 'nope'", "unknown method='nope'"),
]


@pytest.fixture(scope="module")
def photo(noise_photo):
    return noise_photo


@pytest.fixture(scope="module")
def inverted(tiny, photo):
    from stylediffusion import StyleDiffusionEditor

    editor = StyleDiffusionEditor(tiny, progress=False)
    return editor, editor.invert(photo, SOURCE, method="ddim", num_inference_steps=2)


@pytest.mark.parametrize("flags, keywords, cli_says, api_says", CASES, ids=[c[2][:24] for c in CASES])
def test_the_same_bad_input_names_the_callers_parameter(flags, keywords, cli_says, api_says, photo, inverted, tmp_path,
                                                        capsys):
    try:
        code = main(["--model", "tiny", "--device", "cpu", "--progress", "False", "--num_ddim_steps", "2",
                     "--inversion", "ddim", "--image_path", str(photo), "--prompt", SOURCE, "--target", TARGET,
                     "--outdir", str(tmp_path / "out"), *flags])
    except SystemExit as exit:  # a flag argparse refuses
        code = exit.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and cli_says in err[0], err
    editor, inv = inverted
    with pytest.raises(UserError) as api_err:
        editor.edit(inv, TARGET, **keywords)
    message = str(api_err.value)
    assert api_says in message and "--" not in message, message
    assert not (tmp_path / "out").exists()


def test_an_api_call_inside_the_command_line_keeps_the_command_lines_spelling(inverted):
    editor, inv = inverted
    with asked_from("cli"), pytest.raises(UserError, match="--tau_s = 3.0 is outside"):
        editor.edit(inv, TARGET, tau_s=3.0)
    with pytest.raises(UserError, match=r"^the target prompt \(target=\) is empty"):
        editor.edit(inv, EditSpec(SOURCE, "  "))


def test_the_page_names_its_fields_by_their_labels():
    with asked_from("page"):
        with pytest.raises(UserError, match="^edit type 'Sideways' is not one of"):
            edit_spec(EditSpec(SOURCE, TARGET, edit_type="Sideways"))
        with pytest.raises(UserError, match=r"^τ_u \(P2Plus: unconditional self-attention\) = 1.5 is outside"):
            edit_spec(EditSpec(SOURCE, TARGET, tau_u=1.5))
        assert spelled("num_ddim_steps") == "T (DDIM steps)"
    assert spelled("num_ddim_steps") == "--num_ddim_steps"  # nothing asking: the command line's spelling
    with asked_from("api"):
        assert spelled("num_ddim_steps") == "num_inference_steps=" and spelled("blend_word") == "blend_words="


def test_one_description_gives_the_flags_of_the_cli_and_bench():
    cli = vars(build_parser().parse_args([]))
    bench = vars(pie.build_parser().parse_args(["--mapping_file", "m", "--images", "i", "--outdir", "o"]))
    shared = set(cli) & set(bench) & set(SETTINGS)
    assert {"num_ddim_steps", "guidance_scale", "tau_c", "edit_type", "variant", "method_option", "seed"} <= shared
    for name in shared - {"progress"}:  # a benchmark shows no progress bars unless asked
        assert cli[name] == bench[name] == SETTINGS[name].flag_default or name == "method_option", name
    assert cli["progress"] is True and bench["progress"] is False


def test_from_pretrained_names_its_keywords_not_the_flags(capsys):
    from stylediffusion import StyleDiffusionEditor

    with pytest.raises(UserError, match=r"^dtype='float64' is not one of auto"):
        StyleDiffusionEditor.from_pretrained("tiny", device="cpu", torch_dtype="float64", progress=False)
    with pytest.raises(UserError, match=r"^device='gpu9' is not a device"):
        StyleDiffusionEditor.from_pretrained("tiny", device="gpu9", progress=False)
    assert main(["--model", "tiny", "--device", "gpu9", "--idx", "0"]) == 2
    assert "--device 'gpu9' is not a device" in capsys.readouterr().err

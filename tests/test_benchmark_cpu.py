"""The GPU benchmark's CPU tiny mode: both cost structures run, count what they claim, and agree.

Runs benchmarks/gpu_bench.py in-process with a few iterations (T=3, K=2: 6 training iterations), and
benchmarks/precision_check.py's check on the same schedule.
"""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
T, K = 3, 2


def _load_program(stem: str):
    name = f"stylediffusion_{stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_program("gpu_bench")


@pytest.fixture(scope="module")
def precision():
    return _load_program("precision_check")


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    lines = []
    results = bench.main(["--device", "cpu", "--size", "tiny", "--steps", str(T), "--inner_steps", str(K),
                          "--out", str(out)], log=lines.append)
    return results, json.loads(out.read_text()), lines


def test_both_modes_ran_with_the_same_work(bench, run):
    results, written, _ = run
    iterations = bench.schedule_iterations(T, K)
    assert iterations == 6
    assert written["failed_modes"] == {}
    assert set(written["modes"]) == {"reference", "fast"}
    assert written["train_iterations"] == iterations
    for _name, mode in written["modes"].items():
        phases = mode["phases"]
        assert set(phases) == {"inversion", "training", "edit"}
        for rec in phases.values():
            assert rec["seconds"] > 0 and rec["cpu_seconds"] > 0 and rec["ms_per_unet_call"] > 0
            assert rec["tflops_per_s"] > 0
            assert "peak_memory_bytes" in rec  # None on the CPU
        assert phases["inversion"]["calls"] == T
        # per step: one unconditional call, K_i back-propagated calls, one final call with the learned M_i
        assert phases["training"]["iterations"] == iterations
        assert phases["training"]["rows_forward_backward"] == iterations
        assert phases["training"]["calls"] == iterations + 2 * T
        assert mode["total_seconds"] == pytest.approx(sum(r["seconds"] for r in phases.values()))
    ref, fast = written["modes"]["reference"], written["modes"]["fast"]
    # the reference splits the branches of the edit; the fast path batches all four rows in one call
    assert ref["phases"]["edit"]["calls"] == 2 * T and fast["phases"]["edit"]["calls"] == T
    assert ref["phases"]["edit"]["rows_forward"] == fast["phases"]["edit"]["rows_forward"] == 4 * T
    assert ref["settings"]["explicit_attention"] and ref["settings"]["unet_weight_grads"]
    assert not fast["settings"]["explicit_attention"] and not fast["settings"]["unet_weight_grads"]


def test_reference_reruns_the_image_encoder_per_cross_attention_layer(run, tiny):
    _, written, _ = run
    cross_layers = sum(1 for m in tiny.unet.modules() if getattr(m, "is_cross_attention", False))
    assert cross_layers > 0
    ref, fast = written["modes"]["reference"]["phases"], written["modes"]["fast"]["phases"]
    # training: every back-propagated call and every final call carries learned values
    assert ref["training"]["image_encoder_calls"] == cross_layers * (ref["training"]["iterations"] + T)
    assert ref["edit"]["image_encoder_calls"] == cross_layers * T  # the conditional call of each step
    assert ref["inversion"]["image_encoder_calls"] == 0  # no learned values during inversion
    assert all(fast[p]["image_encoder_calls"] == 0 for p in fast)  # features computed once, before timing


def test_modes_compute_the_same_edit_and_report_ratios(run):
    results, written, lines = run
    # Same weights, fp32 on the CPU: explicit vs fused attention and split vs batched calls only. With the
    # same mapping networks the two edits agree to ~1e-5; over long training, Adam amplifies rounding
    # differences (docs/performance.md), so this tight bound holds for the short schedule used here.
    assert written["edit_max_abs_diff_reference_vs_fast"] < 1e-3 * max(1.0, written["edit_latent_std"])
    for key in ("ratios", "ratios_cpu_time"):  # wall-clock and (on the CPU) CPU-time speed-ups
        assert set(written[key]) == {"inversion", "training", "edit", "train+edit", "total"}
        assert all(r > 0 for r in written[key].values())
    assert written["targets"]["applicable"] is False  # tiny CPU runs never claim the H100 targets
    # the ratio table is printed last
    printed = "\n".join(lines).splitlines()
    assert printed[-1].startswith("| total |") and "speed-up" in "\n".join(printed[-8:])
    assert "edit_latents" not in written["modes"]["fast"]


def test_iterations_option_picks_the_schedule():
    from benchmarks.bench_models import inner_steps_for, schedule_iterations

    assert schedule_iterations(30, 100) == 1015
    assert inner_steps_for(30, 1015) == 100
    k = inner_steps_for(10, 50)
    assert schedule_iterations(10, k) >= 50 > schedule_iterations(10, k - 1)


def test_check_precision_flag_points_to_its_own_program(bench, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--check_precision", "--precision_dtypes", "bfloat16"])
    assert exit_info.value.code == 2
    assert "benchmarks/precision_check.py" in capsys.readouterr().err


@pytest.mark.parametrize(
    "program, argv, says",
    [
        ("gpu_bench", ["--modes", "reference,slow"], "unknown --modes ['slow']"),
        ("precision_check", ["--precision_dtypes", "bfloat16,int8"], "'int8' is not <dtype>"),
        (
            "precision_check",
            ["--precision_image", "chelsea.jpg"],
            "--precision_image and --precision_prompt go together",
        ),
        (
            "precision_check",
            ["--precision_image", "nope.png", "--precision_prompt", "a cat"],
            "no file data/images/nope.png",
        ),
    ],
)
def test_bad_flags_are_one_line_and_exit_code_2(program, argv, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _load_program(program).parse_args(argv)
    assert exit_info.value.code == 2
    assert says in capsys.readouterr().err


def test_reference_recorder_is_passed_in_not_patched(bench, tiny):
    """The reference mode's explicit-everywhere recorder reaches inversion through its parameter; the
    core's default recorder stays the one it constructs (no module attribute is swapped)."""
    from benchmarks.cost_modes import ExplicitRecorder, recorder_for
    from stylediffusion import sampling, training
    from stylediffusion.attention_control import CrossAttentionRecorder

    assert sampling.CrossAttentionRecorder is training.CrossAttentionRecorder is CrossAttentionRecorder
    assert recorder_for(False) is None and isinstance(recorder_for(True, keep_grad=True), ExplicitRecorder)
    inputs = bench.prepare_inputs(tiny, 0)
    schedule = bench.DDIMSchedule(tiny.scheduler, T)
    recorder = recorder_for(True)
    asked = []
    needs_maps = recorder.needs_maps
    recorder.needs_maps = lambda place, state: asked.append(place) or needs_maps(place, state)
    trajectory = bench.ddim_inversion(tiny, schedule, inputs.z0, inputs.cond, progress=False, recorder=recorder)
    default = bench.ddim_inversion(tiny, schedule, inputs.z0, inputs.cond, progress=False)
    assert trajectory.maps is recorder.maps
    assert any(not place.is_cross for place in asked)  # it was asked in self-attention layers too
    assert trajectory.maps.keys() == default.maps.keys()
    for i in default.maps:  # the same mid-low maps as the default recorder's (explicit vs its own path)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(trajectory.maps[i], default.maps[i]))


def test_reference_and_fast_edits_agree_for_the_same_mapping_networks(bench, tiny):
    """The reference emulation changes the cost, not the result: split calls + explicit attention."""
    inputs = bench.prepare_inputs(tiny, 0)
    schedule = bench.DDIMSchedule(tiny.scheduler, T)
    torch.manual_seed(0)
    mappers = bench.MappingNetworks(bench.mapping_config(tiny, inputs.features, inputs.cond, "modulate"), T)
    trajectory = bench.ddim_inversion(tiny, schedule, inputs.z0, inputs.cond, progress=False)
    spec = bench.EditSpec(bench.SOURCE_PROMPT, bench.TARGET_PROMPT, tau_u=0.5)
    fast = bench.run_edit(tiny, schedule, trajectory.z_T, spec, mappers=mappers, image_features=inputs.features,
                          progress=False).latents
    reference = bench.reference_edit(tiny, schedule, trajectory.z_T, spec, mappers, inputs.features)
    assert torch.allclose(fast, reference, atol=1e-4, rtol=0)
    assert (fast[0] - fast[1]).abs().max() > 1e-3  # the edit did something


def test_bfloat16_training_keeps_reconstruction_psnr(precision):
    """UNet in bf16, mapping networks and losses in fp32: reconstruction PSNR close to fp32.

    The issue asks for < 0.1 dB. On this random tiny model that holds for short schedules (-0.05 dB
    at T=3, K=2) but NOT for the full T=30, K=100 schedule (about -0.7 dB, see docs/performance.md),
    so the test guards the plumbing and a looser bound; the benchmark reports the 0.1 dB verdict.
    """
    result = precision.check_precision("tiny", torch.device("cpu"), num_steps=T, num_inner_steps=K)
    runs = result["runs"]
    assert result["failed"] == {}
    assert set(runs) == {"float32", "bfloat16"}
    for run_ in runs.values():
        assert run_["iterations"] == precision.schedule_iterations(T, K)
        assert all(v is None or v == v for v in run_.values())  # no NaN
    # the two runs really differ in precision (identical results would mean bf16 was not used)
    assert runs["bfloat16"]["latent_psnr_vs_float32_reconstruction_db"] < 120
    delta = result["deltas"]["bfloat16"]
    assert abs(delta["image_db"]) < 0.5 and abs(delta["latent_db"]) < 0.5
    assert delta["within_tolerance"] == (abs(delta["image_db"]) < result["tolerance_db"])
    assert delta["within_tolerance_input_image"] == (abs(delta["input_image_db"]) < result["tolerance_db"])
    # against the input image the (random) VAE's error dominates: far below the inversion's own PSNR
    assert runs["float32"]["psnr_input_image_db"] < runs["float32"]["psnr_image_db"]


def test_sd15_training_cost_from_shapes():
    """Shapes-only estimate (meta device): fused attention and frozen weights keep the fast mode small."""
    from benchmarks import sd15_training_cost

    gib = 2 ** 30
    modes = sd15_training_cost.cost_modes
    reference = sd15_training_cost.estimate(modes.reference_mode())
    fast = sd15_training_cost.estimate(modes.fast_mode(torch.device("cuda"), "bfloat16", False, False))
    assert reference["weight_grad_bytes"] > 3 * gib and fast["weight_grad_bytes"] == 0
    # the reference materialises the 4096x4096 self-attention maps of the 64x64 layers; the fast mode does not
    assert reference["largest_saved"][0][0].startswith("(1, 8, 4096, 4096)")
    assert all("4096, 4096" not in label for label, _ in fast["largest_saved"])
    assert fast["total_bytes"] < 8 * gib < reference["total_bytes"]
    # FLOPs: a UNet forward at 512 is ~0.8 TFLOP; frozen weights save the weight-gradient work and the
    # reference re-runs the image encoder in each of the 16 cross-attention layers
    assert 0.75e12 < fast["flops"]["call_plain"] < 0.85e12
    assert abs(fast["flops"]["call_learned"] - fast["flops"]["call_plain"]) < 1e9  # the mapping network only
    assert reference["flops"]["call_learned"] > reference["flops"]["call_plain"] + 16 * 0.03e12
    assert fast["flops"]["train_iteration"] < 2.2 * fast["flops"]["call_plain"]
    assert reference["flops"]["train_iteration"] > 1.7 * fast["flops"]["train_iteration"]


def test_vae_ceiling_reads_a_committed_run_and_refuses_other_files(capsys, tmp_path):
    """The figure docs/testbed.md quotes: stylediffusion_plus on the VAE's round trip, Null-text above it."""
    ceiling = _load_program("testbed_vae_ceiling")
    results = ROOT / "docs" / "testbed_bench" / "sdplus" / "inversion_T50_seed4321" / "results.csv"
    ceiling.main(["--seed", "4321", "--n", "2", "--results", str(results)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| 0 | 40.99 dB |") and "+1.096 dB" in lines[3]  # scene 1: Null-text above it
    assert all("| +0.000 dB |" in line or "| -0.000 dB |" in line for line in lines[2:4])
    for argv in (["--results", str(tmp_path / "missing.csv")], ["--results", str(ROOT / "README.md")],
                 ["--n", "7", "--results", str(results)]):
        with pytest.raises(SystemExit) as err:
            ceiling.main(["--seed", "4321", "--n", "2", *argv])
        assert err.value.code == 2

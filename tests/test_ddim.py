"""The DDIM step functions against closed-form answers and against diffusers' own scheduler."""
import pytest
import torch
from diffusers import DDIMScheduler

from stylediffusion.ddim import DDIMSchedule, x0_and_eps
from stylediffusion.models import SD_SCHEDULER_CONFIG


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_exact_model_output_moves_exactly(prediction_type):
    sched = DDIMSchedule(DDIMScheduler(**{**SD_SCHEDULER_CONFIG, "prediction_type": prediction_type}), 10)
    g = torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64),
        torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64),
    )
    i = 3
    a_t, a_s = sched.alpha(i), sched.alpha_prev(i)
    z_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
    out = {"epsilon": eps, "v_prediction": a_t.sqrt() * eps - (1 - a_t).sqrt() * x0, "sample": x0}[prediction_type]
    rx0, reps = x0_and_eps(out, z_t, a_t, prediction_type)
    assert torch.allclose(rx0, x0, atol=1e-10) and torch.allclose(reps, eps, atol=1e-10)
    z_s = (a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps).float()
    assert torch.allclose(sched.sample_step(out.float(), z_t.float(), i), z_s, atol=1e-5)
    if prediction_type == "epsilon":  # inversion is the same move upward
        assert torch.allclose(sched.invert_step(eps.float(), z_s, i), z_t.float(), atol=1e-5)


def test_sampling_step_matches_diffusers():
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    sched = DDIMSchedule(scheduler, 30)
    g = torch.Generator().manual_seed(1)
    z, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for i in (0, 14, 29):
        ours = sched.sample_step(eps, z, i)
        theirs = scheduler.step(eps, sched.timesteps[i], z, eta=0.0).prev_sample
        assert torch.allclose(ours, theirs, atol=1e-5)
    assert sched.timesteps[0] > sched.timesteps[-1] == 1  # steps_offset 1


def test_paper_ddim_has_steps_offset_0_like_the_released_code():
    """The released StyleDiffusion code, Null-text's notebook and PnPInversion build their DDIMScheduler
    without steps_offset (diffusers' default 0), whatever the SD folder's config says (1)."""
    from stylediffusion.ddim import make_ddim_scheduler

    sched = make_ddim_scheduler(SD_SCHEDULER_CONFIG)  # the folder's config says steps_offset 1
    assert sched.config.steps_offset == 0
    assert not sched.config.clip_sample and not sched.config.set_alpha_to_one
    assert DDIMSchedule(sched, 50).timesteps.tolist() == list(range(980, -1, -20))
    assert DDIMSchedule(make_ddim_scheduler(SD_SCHEDULER_CONFIG), 30).timesteps.tolist() == list(range(957, -1, -33))

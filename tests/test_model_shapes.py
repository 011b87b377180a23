"""Any SD-shaped model: layers are found by query resolution, so other depths and non-square latents work."""
import dataclasses

import torch
from diffusers import UNet2DConditionModel

from stylediffusion.ddim import DDIMSchedule
from stylediffusion.editing import EditSpec, run_edit
from stylediffusion.encoders import encode_prompts
from stylediffusion.mapping import MappingConfig, MappingNetworks
from stylediffusion.sampling import ddim_inversion
from stylediffusion.training import TrainConfig, train_mapping_networks


def test_three_level_unet_with_non_square_latent(tiny):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=(16, 8), in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
    ).requires_grad_(False).eval()
    bundle = dataclasses.replace(tiny, unet=unet)
    schedule = DDIMSchedule(bundle.scheduler, 4)
    cond, uncond = encode_prompts(bundle, ["a photo of a cat"]), encode_prompts(bundle, [""])
    z0 = torch.randn(1, 4, 16, 8)
    trajectory = ddim_inversion(bundle, schedule, z0, cond, progress=False)
    # mid-low = (latent / 4)^2 = 4 x 2 queries: the last down level, the mid block and the first up level
    assert len(trajectory.maps[0]) == 1 + 1 + 2
    assert all(m.shape[-2:] == (8, 77) for m in trajectory.maps[0])
    feats = torch.randn(1, 17, 48)
    mappers = MappingNetworks(MappingConfig(17, 48, 77, 32), 4)
    train_mapping_networks(bundle, schedule, trajectory, feats, cond, uncond, mappers, TrainConfig(num_inner_steps=2),
                           progress=False)
    spec = EditSpec("a photo of a cat", "a photo of a dog", blend_words=("cat", "dog"), tau_u=0.5)
    out = run_edit(bundle, schedule, trajectory.z_T, spec, mappers, feats, progress=False)
    assert out.latents.shape == (2, 4, 16, 8)
    assert out.controller.average_maps().shape == (2, 8, 77)

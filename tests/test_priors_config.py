"""The priors' knobs are bounded in their configs: a bad value is a one-line pydantic error
naming the knob, its value, the allowed range and why."""

import pytest
from pydantic import ValidationError

from d2.stages.priors import PriorsConfig, TinyPriorConfig, load_priors


@pytest.mark.parametrize("tiny, message", [
    ({"block_out_channels": (30, 64)}, "priors.tiny.block_out_channels = [30, 64]: every width must be a positive "
                                       "multiple of 32 (GroupNorm with 32 groups)"),
    ({"block_out_channels": ()}, "priors.tiny.block_out_channels = []: every width"),
    ({"vae_block_out_channels": (32, -32)}, "priors.tiny.vae_block_out_channels = [32, -32]: every width"),
    ({"resolution": 30}, "priors.tiny.resolution = 30 must be a positive multiple of 4 (the VAE and UNet "
                         "downsampling)"),
    ({"resolution": 4, "block_out_channels": (32, 32, 32)}, "priors.tiny.resolution = 4 must be a positive "
                                                            "multiple of 8"),
    ({"resolution": 0, "vae": False, "block_out_channels": (32,)}, "priors.tiny.resolution = 0 must be a positive "
                                                                   "multiple of 1"),
    ({"layers_per_block": 0}, "priors.tiny.layers_per_block = 0 must be >= 1"),
    ({"num_attention_heads": 0}, "priors.tiny.num_attention_heads = 0 must be >= 1"),
    ({"clip_layers": 0}, "priors.tiny.clip_layers = 0 must be >= 1"),
    ({"cross_attention_dim": 0}, "priors.tiny.cross_attention_dim = 0 must be >= 1"),
    ({"clip_image_size": 20}, "priors.tiny.clip_image_size = 20 must be a positive multiple of 8 (the CLIP patch)"),
    ({"clip_hidden_size": 33}, "priors.tiny.clip_hidden_size = 33 must be a positive multiple of 2 (the CLIP heads)"),
    ({"seed": -1}, "priors.tiny.seed = -1 is outside [0, 9223372036854775806]: seeds are non-negative 64-bit"),
    ({"seed": 2**63 - 1}, "priors.tiny.seed = 9223372036854775807 is outside [0, 9223372036854775806]"),
])
def test_tiny_sizes_outside_their_bounds_fail_in_the_config(tiny: dict, message: str) -> None:
    with pytest.raises(ValidationError) as e:
        PriorsConfig(tiny=tiny)
    assert message in str(e.value)
    with pytest.raises(ValidationError, match="priors.tiny."):
        TinyPriorConfig(**tiny)


@pytest.mark.parametrize("value", [0, -3, 65536, 10**6])
def test_attention_batch_is_bounded_by_the_cuda_grid(value: int) -> None:
    with pytest.raises(ValidationError) as e:
        PriorsConfig(attention_max_batch=value)
    assert (f"priors.attention_max_batch = {value} is outside [1, 65535]: CUDA launches at most 65535 blocks per "
            "grid dimension") in str(e.value)


def test_values_at_the_bounds_are_accepted_and_load() -> None:
    PriorsConfig(attention_max_batch=1)
    PriorsConfig(attention_max_batch=65535)
    TinyPriorConfig(seed=2**63 - 2)
    cfg = PriorsConfig(tiny=TinyPriorConfig(resolution=16, vae=False, block_out_channels=(32, 64), clip_hidden_size=2,
                                            clip_image_size=8, clip_layers=1, seed=5), attention_max_batch=1)
    video, multiview = load_priors(cfg)
    assert video.resolution == multiview.resolution == 16 and video.latent_size == 16

"""SV3D_p UNet: per-frame camera conditioning and Stability key-layout conversion."""

import math

import pytest
import torch
from safetensors.torch import save_file

from d2.stages.priors import TinyPriorConfig, load_sv3d_unet, tiny_unet_config
from d2.stages.sv3d import (
    SV3D_P_UNET_CONFIG,
    SV3DUNet,
    convert_sgm_unet_state_dict,
    sgm_key_pattern_ok,
    to_sgm_unet_state_dict,
)


def _tiny_unet(seed: int) -> SV3DUNet:
    torch.manual_seed(seed)
    return SV3DUNet(**tiny_unet_config(TinyPriorConfig(), "multiview", 4, 4)).eval()


def _inputs(b: int = 2, t: int = 4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, t, 8, 16, 16, generator=g)
    ctx = torch.randn(b, 1, 32, generator=g)
    az = torch.tensor([(v + 1) * 2 * math.pi / t for v in range(t)])
    ids = torch.stack([torch.full((t,), 1e-5), torch.full((t,), math.radians(80.0)), az], -1)[None].repeat(b, 1, 1)
    return x, torch.tensor([0.3, -1.2]), ctx, ids


def _sinusoid(x: torch.Tensor, dim: int) -> torch.Tensor:
    """sgm's timestep_embedding: [cos(x f_k), sin(x f_k)], f_k = 10000^(-k/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    args = x.double()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


def test_added_ids_embedding_is_per_frame_sinusoid():
    unet = _tiny_unet(0)
    _, _, _, ids = _inputs()
    emb = unet.embed_added_ids(ids)  # [B*T, 5d]
    d = unet.config.addition_time_embed_dim
    flat = ids.reshape(-1, 3)
    expect = torch.cat([_sinusoid(flat[:, 0], d), _sinusoid(flat[:, 1], 2 * d), _sinusoid(flat[:, 2], 2 * d)], -1)
    assert emb.shape == (8, 5 * d)
    torch.testing.assert_close(emb.double(), expect, atol=1e-5, rtol=1e-5)


def test_camera_changes_output_and_batch_elements_are_independent():
    unet = _tiny_unet(0)
    x, t, ctx, ids = _inputs()
    with torch.no_grad():
        out = unet(x, t, ctx, ids).sample
        ids2 = ids.clone()
        ids2[1, :, 2] += 0.7  # rotate element 1's orbit
        out2 = unet(x, t, ctx, ids2).sample
        solo = unet(x[:1], t[:1], ctx[:1], ids[:1]).sample
    assert out.shape == (2, 4, 4, 16, 16)
    torch.testing.assert_close(out2[0], out[0])
    assert (out2[1] - out[1]).abs().max() > 1e-4
    torch.testing.assert_close(solo[0], out[0], atol=1e-5, rtol=1e-4)


def test_stability_layout_roundtrip_loads_strictly_with_identical_outputs(tmp_path):
    native = _tiny_unet(0)
    sd = to_sgm_unet_state_dict(native)
    assert all(k.startswith("model.diffusion_model.") for k in sd)
    assert all(sgm_key_pattern_ok(k[len("model.diffusion_model."):]) for k in sd)
    # keys of Stability's VideoUNet layout for this 2-level config
    for k in ["input_blocks.1.1.time_stack.0.attn1.to_q.weight", "input_blocks.2.0.op.weight",
              "input_blocks.1.0.time_stack.in_layers.2.weight", "middle_block.1.time_pos_embed.0.weight",
              "output_blocks.1.1.conv.weight", "label_emb.0.0.weight", "out.2.bias", "time_embed.0.weight",
              "middle_block.2.time_mixer.mix_factor", "output_blocks.3.1.proj_out.weight"]:
        assert "model.diffusion_model." + k in sd, k
    # a full checkpoint also carries conditioner / first-stage weights: they are skipped
    sd = {k: v.clone() for k, v in sd.items()}
    sd["conditioner.embedders.0.open_clip.model.visual.proj"] = torch.zeros(2, 2)
    sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, 2)
    path = tmp_path / "sv3d_tiny.safetensors"
    save_file(sd, str(path))
    loaded = load_sv3d_unet(path, config=dict(native.config)).eval()  # strict=True inside
    x, t, ctx, ids = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, ctx, ids).sample, native(x, t, ctx, ids).sample, rtol=0, atol=0)


def test_conversion_rejects_unknown_and_missing_keys():
    native = _tiny_unet(0)
    sd = to_sgm_unet_state_dict(native)
    bad = dict(sd)
    bad["model.diffusion_model.input_blocks.1.9.weird.weight"] = torch.zeros(1)
    with pytest.raises(KeyError):
        convert_sgm_unet_state_dict(bad, native)
    partial = dict(sd)
    partial.pop("model.diffusion_model.out.2.weight")
    fresh = _tiny_unet(1)
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict(convert_sgm_unet_state_dict(partial, fresh), strict=True)


def test_full_size_sv3d_layout_on_meta():
    with torch.device("meta"):
        unet = SV3DUNet(**SV3D_P_UNET_CONFIG)
    n = sum(p.numel() for p in unet.parameters())
    assert 1.50e9 < n < 1.55e9  # SVD/SV3D UNet: ~1.52 B parameters
    assert unet.add_embedding.linear_1.in_features == 1280
    sd = to_sgm_unet_state_dict(unet)
    for k in ["input_blocks.8.1.time_stack.0.ff.net.2.weight", "input_blocks.11.0.out_layers.3.weight", "output_blocks.11.1.proj_out.weight",
              "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight",
              "input_blocks.9.0.op.weight", "input_blocks.4.0.skip_connection.weight"]:
        assert "model.diffusion_model." + k in sd, k
    assert set(convert_sgm_unet_state_dict(sd, unet)) == set(unet.state_dict())

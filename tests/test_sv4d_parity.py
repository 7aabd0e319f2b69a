"""SV4D / SV4D 2.0's UNet (d2.stages.sv4d) against Stability's ``SpatialUNetModelWithTime`` through goldens.

tests/fixtures/make_sv4d_goldens.py wrote tests/fixtures/sv4d_goldens.safetensors once from a
generative-models export (its docstring says how; sv4d_goldens.json records the commit, the
tiny networks' arguments, the released network configs and the key list of sgm's full-size
networks). Here the same random weights load strictly into :class:`SV4DUNet` and must give
sgm's outputs: float64 on both sides, 1e-12 absolute on outputs of mean size ~0.4 (what is left
is float64 rounding of differently ordered sums; our code follows sgm's order, and today the
difference is exactly 0). A wrong layout, blend or embedding shows as >= 1e-3.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from d2.stages.priors.base import MissingWeightsError
from d2.stages.sv4d import (SGM_UNET_PREFIX, SV4D_CHECKPOINTS, SV4D_CONFIGS, SV4DUNet, SV4DUNetConfig,
                            convert_sgm_sv4d_state_dict, find_sv4d_checkpoint, load_sv4d_unet,
                            tiny_sv4d_unet_config, to_sgm_sv4d_state_dict)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
VERSIONS = ("sv4d", "sv4d2", "sv4d2_8views")

# sgm arguments whose value our code hard-codes (SV4DUNetConfig's docstring): every released yaml has these
FIXED = dict(use_linear_in_transformer=True, use_spatial_context=True, use_spatial_transformer=True,
             use_motion_attention=True, legacy=False, num_classes="sequential", time_mix_legacy=False,
             time_block_merge_strategy="learned_with_images", use_checkpoint=False)


@pytest.fixture(scope="module")
def golden():
    data = load_file(str(FIXTURES / "sv4d_goldens.safetensors"))
    meta = json.loads((FIXTURES / "sv4d_goldens.json").read_text())
    return data, meta


def our_config(sgm: dict) -> SV4DUNetConfig:
    """SV4DUNetConfig from sgm's ``SpatialUNetModelWithTime`` arguments (a yaml's network_config)."""
    for k, val in FIXED.items():
        assert sgm[k] == val, f"sgm argument {k}={sgm[k]!r}, our code assumes {val!r}"
    return SV4DUNetConfig(
        in_channels=sgm["in_channels"], out_channels=sgm["out_channels"], model_channels=sgm["model_channels"],
        channel_mult=tuple(sgm["channel_mult"]), num_res_blocks=sgm["num_res_blocks"],
        attention_resolutions=tuple(sgm["attention_resolutions"]), num_head_channels=sgm["num_head_channels"],
        transformer_depth=sgm["transformer_depth"], context_dim=sgm["context_dim"],
        motion_context_dim=sgm["motion_context_dim"], adm_in_channels=sgm["adm_in_channels"],
        time_kernel_size=tuple(sgm["time_kernel_size"]), merge_factor=sgm["time_block_merge_factor"],
        extra_ff_mix_layer=sgm["extra_ff_mix_layer"], use_camera_emb=sgm.get("use_camera_emb", False),
        use_3d_attention=sgm.get("use_3d_attention", False),
        separate_motion_merge_factor=sgm.get("separate_motion_merge_factor", False))


def golden_weights(data: dict, version: str) -> dict[str, torch.Tensor]:
    """The tiny network's weights in Stability's layout (sv4d2's = sv4d's + its own tensors), float64."""
    sd = {k[len("sv4d.weights."):]: v.double() for k, v in data.items() if k.startswith("sv4d.weights.")}
    if version != "sv4d":
        sd.update({k[len("sv4d2.weights."):]: v.double() for k, v in data.items() if k.startswith("sv4d2.weights.")})
    return sd


def run(unet: SV4DUNet, data: dict, meta: dict) -> torch.Tensor:
    """One forward with the goldens' inputs, called with sgm's argument names."""
    inp = {k[len("inputs."):]: v for k, v in data.items() if k.startswith("inputs.")}
    with torch.no_grad():
        return unet(inp["x"], inp["timesteps"], context=inp["context"], y=inp["y"],
                    num_video_frames=meta["time"] * meta["views"], image_only_indicator=inp["image_only_indicator"],
                    cond_view=inp["cond_view"], cond_motion=inp["cond_motion"])


@pytest.mark.parametrize("version", VERSIONS)
def test_sv4d_unet_matches_sgm(golden, version):
    data, meta = golden
    cfg = our_config(meta["tiny"][version])
    assert cfg == tiny_sv4d_unet_config(version)  # the tests' builder is the goldens' network
    unet = load_sv4d_unet(golden_weights(data, version), version, torch.float64, config=cfg)
    out = run(unet, data, meta)
    ref = data[f"{version}.output"]
    assert ref.abs().mean() > 0.1
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def test_versions_differ_where_sgm_does(golden):
    """The three flag sets change sgm's output; the goldens would not notice a flag we ignore otherwise."""
    data, _ = golden
    for a, b in (("sv4d", "sv4d2"), ("sv4d2", "sv4d2_8views")):
        assert (data[f"{a}.output"] - data[f"{b}.output"]).abs().max() > 1e-3


@pytest.mark.parametrize("version", VERSIONS)
def test_full_size_configs_are_the_released_yaml(golden, version):
    _, meta = golden
    assert our_config(meta["released_network_configs"][version]) == SV4D_CONFIGS[version]


@pytest.mark.parametrize("version", ["sv4d", "sv4d2", "sv4d2_8views"])
def test_full_size_keys_map_both_ways(golden, version):
    """Every key of sgm's full-size network (recorded by the goldens script) maps onto ours and back, shapes too."""
    _, meta = golden
    theirs = meta["full_size_keys"]["sv4d" if version == "sv4d" else "sv4d2"]  # 8views has sv4d2's keys
    with torch.device("meta"):
        unet = SV4DUNet(SV4D_CONFIGS[version])
    ours = {k: list(v.shape) for k, v in to_sgm_sv4d_state_dict(unet).items()}
    assert ours == {SGM_UNET_PREFIX + k: v for k, v in theirs.items()}
    ckpt = {SGM_UNET_PREFIX + k: torch.empty(shape, device="meta") for k, shape in theirs.items()}
    ckpt["conditioner.embedders.0.weight"] = torch.empty(3, device="meta")  # outside the UNet: ignored
    converted = convert_sgm_sv4d_state_dict(ckpt, unet)
    assert set(converted) == set(unet.state_dict())
    unet.load_state_dict(converted, strict=True, assign=True)


def test_forward_takes_sgm_arguments(golden):
    _, meta = golden
    assert list(inspect.signature(SV4DUNet.forward).parameters)[1:] == meta["forward_arguments"]


def test_mismatched_checkpoints_are_refused_by_name(golden):
    data, _ = golden
    sd = golden_weights(data, "sv4d")
    unet = SV4DUNet(tiny_sv4d_unet_config("sv4d"))
    unknown = {**sd, SGM_UNET_PREFIX + "input_blocks.1.1.extra.weight": torch.zeros(1)}
    with pytest.raises(KeyError, match=r"unknown keys: model\.diffusion_model\.input_blocks\.1\.1\.extra\.weight"):
        convert_sgm_sv4d_state_dict(unknown, unet)
    dropped = SGM_UNET_PREFIX + "middle_block.1.motion_blocks.0.attn2.to_v.weight"
    with pytest.raises(KeyError, match=r"missing keys: " + dropped.replace(".", r"\.")):
        convert_sgm_sv4d_state_dict({k: v for k, v in sd.items() if k != dropped}, unet)
    with pytest.raises(KeyError, match=r"shape mismatches.*time_mix_time_embed\.0\.weight.*load it as version 'sv4d'"):
        load_sv4d_unet(sd, "sv4d2", torch.float64, config=tiny_sv4d_unet_config("sv4d2"))  # SV4D weights, 2.0 config
    with pytest.raises(KeyError, match="no key starts with 'model.diffusion_model.'"):
        convert_sgm_sv4d_state_dict({"first_stage_model.decoder.conv_in.weight": torch.zeros(1)}, unet)


def test_checkpoint_lookup_names_file_repo_and_command(tmp_path):
    for version in ("sv4d", "sv4d2"):
        repo, name = SV4D_CHECKPOINTS[version]
        with pytest.raises(MissingWeightsError) as err:
            find_sv4d_checkpoint(version, cache_dir=tmp_path)
        msg = str(err.value)
        assert name in msg and f"https://huggingface.co/{repo}" in msg and str(tmp_path) in msg
        assert f"huggingface-cli download {repo} {name}" in msg
    assert SV4D_CHECKPOINTS["sv4d"] == ("stabilityai/sv4d", "sv4d.safetensors")
    assert SV4D_CHECKPOINTS["sv4d2"] == ("stabilityai/sv4d2.0", "sv4d2.safetensors")
    with pytest.raises(MissingWeightsError, match=r"sv4d2\.safetensors of stabilityai/sv4d2\.0; no file at .*absent"):
        load_sv4d_unet(tmp_path / "absent.safetensors", "sv4d2")


def test_loads_a_cached_checkpoint_file(golden, tmp_path):
    """A Stability-layout file in the Hugging Face cache's layout is found and loads strictly (UNet keys only)."""
    data, meta = golden
    snap = tmp_path / "models--stabilityai--sv4d" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (tmp_path / "models--stabilityai--sv4d" / "refs").mkdir()
    (tmp_path / "models--stabilityai--sv4d" / "refs" / "main").write_text("0123abcd")
    sd = {k: v.half() for k, v in golden_weights(data, "sv4d").items()}
    save_file({**sd, "first_stage_model.decoder.conv_in.weight": torch.zeros(2)}, str(snap / "sv4d.safetensors"))
    path = find_sv4d_checkpoint("sv4d", cache_dir=tmp_path)
    assert path == snap / "sv4d.safetensors"
    unet = load_sv4d_unet(path, "sv4d", torch.float64, config=tiny_sv4d_unet_config("sv4d"))
    torch.testing.assert_close(run(unet, data, meta), data["sv4d.output"], atol=1e-12, rtol=0)


def test_bfloat16_runs_close_to_float64(golden):
    """Half precision: GroupNorm upcast, float32 sinusoids cast to the weights, output back in x's dtype."""
    data, meta = golden
    unet = load_sv4d_unet(golden_weights(data, "sv4d2"), "sv4d2", torch.bfloat16, config=tiny_sv4d_unet_config("sv4d2"))
    inp = {k[len("inputs."):]: v.float() for k, v in data.items() if k.startswith("inputs.")}
    with torch.no_grad():
        out = unet(inp["x"], inp["timesteps"], context=inp["context"], y=inp["y"], cond_view=inp["cond_view"])
    ref = data["sv4d2.output"]
    assert out.dtype == torch.float32
    assert (out.double() - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_bad_conditioning_is_refused_before_any_work(golden):
    data, meta = golden
    unet = SV4DUNet(tiny_sv4d_unet_config("sv4d")).double()
    inp = {k[len("inputs."):]: v for k, v in data.items() if k.startswith("inputs.")}
    with pytest.raises(ValueError, match="needs cond_view"):
        unet(inp["x"], inp["timesteps"], context=inp["context"], y=inp["y"])
    with pytest.raises(ValueError, match=r"need B\*T\*V = 2\*3\*4 = 24 rows"):
        unet(inp["x"][:12], inp["timesteps"][:12], context=inp["context"], y=inp["y"][:12],
             cond_view=inp["cond_view"])
    with pytest.raises(ValueError, match="num_video_frames 5 does not divide"):
        unet(inp["x"], inp["timesteps"], context=inp["context"], y=inp["y"], cond_view=inp["cond_view"],
             num_video_frames=5)
    with pytest.raises(ValueError, match="adm_in_channels = 4 \\* model_channels"):
        tiny_sv4d_unet_config("sv4d2", adm_in_channels=96)


def test_attention_in_pieces_gives_the_same_output(golden):
    """Attention batches above attention_max_batch run in pieces (CUDA's grid limit); the result is unchanged."""
    data, meta = golden
    cfg = tiny_sv4d_unet_config("sv4d2", attention_max_batch=5)
    unet = load_sv4d_unet(golden_weights(data, "sv4d2"), "sv4d2", torch.float64, config=cfg)
    torch.testing.assert_close(run(unet, data, meta), data["sv4d2.output"], atol=1e-12, rtol=0)

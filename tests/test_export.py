"""Exports: standard 3DGS PLY round trip through plyfile, evaluation views, turntable video."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from plyfile import PlyData

from d2.stages.cameras import OrbitSpec
from d2.stages.export import (
    covariance_from_ply,
    export_ply_sequence,
    ply_property_names,
    quat_to_rotmat,
    read_ply,
    render_eval_views,
    render_turntable,
    render_views,
    rotmat_to_quat,
    splat_arrays_at,
)
from d2.stages.gaussians import Gaussians4D, init_random, procedural_gaussians
from d2.utils.io import load_image, save_tensor

STANDARD = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(45)]
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def _tilted_model() -> Gaussians4D:
    g = init_random(30, sh_degree=2, time_basis=2, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        g.quats_l.copy_(torch.randn(30, 4, generator=gen))
        g.quats_r.copy_(torch.randn(30, 4, generator=gen))
        g.log_scales.copy_(torch.log(torch.rand(30, 4, generator=gen) * 0.1 + 0.02))
        g.log_scales[:, 3] = torch.log(torch.tensor(0.6))
        g.means[:, 3] = torch.rand(30, generator=gen)
        g.opacity_logits.copy_(torch.randn(30, generator=gen))
        g.sh_rest.copy_(torch.randn(30, 8, 3, generator=gen) * 0.1)
        g.time_coefs.copy_(torch.randn(30, 2, 9, 3, generator=gen) * 0.1)
    return g


def test_quaternion_conversions() -> None:
    q = torch.nn.functional.normalize(torch.randn(100, 4, dtype=torch.float64), dim=-1)
    q = torch.where(q[:, :1] < 0, -q, q)
    torch.testing.assert_close(rotmat_to_quat(quat_to_rotmat(q)), q)


def test_ply_round_trip_with_standard_names(tmp_path: Path) -> None:
    g = _tilted_model()
    paths = export_ply_sequence(g, tmp_path / "ply", [0.0, 0.4, 1.0])
    assert [p.name for p in paths] == ["t_00.ply", "t_01.ply", "t_02.ply"]
    ply = PlyData.read(str(paths[1]))
    assert [e.name for e in ply.elements] == ["vertex"]
    assert list(ply["vertex"].data.dtype.names) == STANDARD == ply_property_names()
    back = read_ply(paths[1])
    ref = splat_arrays_at(g, 0.4)
    for k in ref:
        np.testing.assert_allclose(back[k], ref[k], rtol=1e-5, atol=1e-6)
    # the PLY's scale/rotation give back the sliced covariance, and the centres the sliced means
    means, covs, opac = g.slice(torch.tensor([0.4]))
    keep = (opac[0] >= 1e-4).numpy()
    np.testing.assert_allclose(covariance_from_ply(back), covs[0].detach().numpy()[keep], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(back["means"], means[0].detach().numpy()[keep], atol=1e-6)
    sig = 1 / (1 + np.exp(-back["opacity_logits"]))
    np.testing.assert_allclose(sig, opac[0].detach().numpy()[keep], rtol=1e-4)
    # every band at t = 0.4 (they all vary in time; degree 2 padded with zeros to degree 3)
    sh_t = g.sh_at(torch.tensor([0.4]))[0].detach().numpy()[keep]
    np.testing.assert_allclose(back["sh_dc"], sh_t[:, 0], atol=1e-6)
    np.testing.assert_allclose(back["sh_rest"][:, :8], sh_t[:, 1:], atol=1e-6)
    assert np.abs(sh_t[:, 1:] - g.sh_rest.detach().numpy()[keep]).max() > 1e-3
    assert np.all(back["sh_rest"][:, 8:] == 0)
    q = back["quats"]
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-6)
    # the opacity differs between times: each file is its own slice
    first = read_ply(paths[0])
    assert first["means"].shape[0] > 20  # most are alive at t = 0 as well
    assert not np.allclose(first["opacity_logits"][:5], back["opacity_logits"][:5])
    # an empty slice still writes a valid file
    with torch.no_grad():
        g.opacity_logits.fill_(-30.0)
    export_ply_sequence(g, tmp_path / "empty", [0.5])
    assert read_ply(tmp_path / "empty" / "t_00.ply")["means"].shape == (0, 3)


def test_render_eval_views_layout(tmp_path: Path) -> None:
    g = procedural_gaussians(20, seed=3)
    state = g.export_state()
    state["orbit"] = {"radius": 2.0, "fov_deg": 33.8, "elevation_deg": 0.0}
    save_tensor(tmp_path / "gaussians.pt", state)
    azimuths = [-75.0, 15.0, 105.0, 195.0]
    written = render_eval_views(tmp_path / "gaussians.pt", tmp_path / "eval", azimuths, num_frames=3,
                                resolution=24, backend="torch")
    assert len(written) == 12
    for k in range(4):
        assert sorted(p.name for p in (tmp_path / "eval" / f"eval_{k}").iterdir()) == ["0.png", "1.png", "2.png"]
    img = load_image(tmp_path / "eval" / "eval_1" / "2.png")  # azimuth 15, t = 1
    ref = render_views(g, [15.0], [1.0], OrbitSpec(), 24, backend="torch")[0]
    assert img.shape == (3, 24, 24)
    assert (img - ref).abs().max() <= 1 / 255 + 1e-6
    other = load_image(tmp_path / "eval" / "eval_3" / "2.png")
    assert (other - img).abs().mean() > 0.01  # different azimuths show different views


def test_turntable_video(tmp_path: Path) -> None:
    import imageio.v3 as iio

    g = procedural_gaussians(10, seed=2)
    render_turntable(g, tmp_path / "turntable.mp4", OrbitSpec(), 32, num_frames=6, fps=6, backend="torch")
    frames = iio.imread(tmp_path / "turntable.mp4")
    assert frames.shape[0] == 6 and frames.shape[1:3] == (32, 32)
    assert frames.min() < 200  # the object is visible on white

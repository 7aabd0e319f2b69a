"""Exports: standard 3DGS PLY round trip through plyfile, evaluation views, turntable video."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
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
from d2.stages.export import (
    GAUSSIANS_FILE,
    TURNTABLE_MIN_SIZE,
    VIEWER_FROM_WORLD,
    find_gaussians,
    load_gaussians,
    save_gaussians,
    sh_basis,
    to_viewer_axes,
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
    paths = export_ply_sequence(g, tmp_path / "ply", [0.0, 0.4, 1.0], convention="world")
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
    export_ply_sequence(g, tmp_path / "empty", [0.5], convention="world")
    assert read_ply(tmp_path / "empty" / "t_00.ply")["means"].shape == (0, 3)


def test_render_eval_views_layout(tmp_path: Path) -> None:
    g = procedural_gaussians(20, seed=3)
    state = g.export_state()
    state["orbit"] = {"radius": 2.0, "fov_deg": 33.8, "elevation_deg": 0.0}
    save_tensor(tmp_path / "gaussians.pt", state)
    azimuths = [-75.0, 15.0, 105.0, 195.0]
    written = render_eval_views(tmp_path / "gaussians.pt", tmp_path / "eval", azimuths, frames=3,
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
    info = render_turntable(g, tmp_path / "turntable.mp4", OrbitSpec(), 32, num_frames=6, fps=6, backend="torch")
    frames = iio.imread(tmp_path / "turntable.mp4")
    # rendered at 256 px whatever the matrix size, slowed to last 2 s (6 frames at 3 fps)
    assert frames.shape[0] == 6 and frames.shape[1:3] == (TURNTABLE_MIN_SIZE, TURNTABLE_MIN_SIZE) == (256, 256)
    assert info == {"size": 256, "frames": 6, "fps": 3}
    assert iio.immeta(tmp_path / "turntable.mp4", plugin="FFMPEG")["fps"] == 3
    assert frames.min() < 200  # the object is visible on white


def test_ply_viewer_convention_axes(tmp_path: Path) -> None:
    """The default PLY axes are the 3DGS viewers' (y down, camera looking along +z): a Gaussian at
    +z in our world (up) lands at -y (the viewers' up), one at +x (towards the input camera) at -z
    (towards the viewers' default camera), one at +y (the input view's right) at +x (right)."""
    g = Gaussians4D(3, sh_degree=1, time_basis=0)
    with torch.no_grad():
        g.means[:, :3] = torch.tensor([[0.0, 0.0, 0.5], [0.5, 0.0, 0.0], [0.0, 0.5, 0.0]])
        g.means[:, 3] = 0.5
        g.log_scales.copy_(torch.log(torch.tensor([[0.01, 0.02, 0.3, 1.0]] * 3)))  # long along world z
        g.opacity_logits.fill_(4.0)
        g.sh_rest.copy_(torch.randn(3, 3, 3, generator=torch.Generator().manual_seed(0)))
    back = read_ply(export_ply_sequence(g, tmp_path / "ply", [0.5])[0])
    np.testing.assert_allclose(back["means"], [[0, -0.5, 0], [0, 0, -0.5], [0.5, 0, 0]], atol=1e-6)
    # the Gaussian long along world z is long along viewer y
    cov = covariance_from_ply(back)[0]
    assert np.argmax(np.diag(cov)) == 1 and abs(cov[1, 1] - 0.09) < 1e-5
    # the view-dependent colour seen along a world direction d is the one seen along A d
    world = splat_arrays_at(g, 0.5)
    d = np.random.default_rng(1).normal(size=(20, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    for n in range(3):
        c_world = sh_basis(d)[:, 1:] @ world["sh_rest"][n]
        c_viewer = sh_basis(d @ VIEWER_FROM_WORLD.T)[:, 1:] @ back["sh_rest"][n]
        np.testing.assert_allclose(c_viewer, c_world, atol=1e-5)
    assert np.isclose(np.linalg.det(VIEWER_FROM_WORLD), 1.0)
    rot = to_viewer_axes(world)
    np.testing.assert_allclose(np.linalg.norm(rot["quats"], axis=1), 1.0, atol=1e-6)


def test_gaussians_safetensors_round_trip_and_legacy_pt(tmp_path: Path) -> None:
    g = _tilted_model()
    state = g.export_state()
    state["orbit"] = {"radius": 2.5, "fov_deg": 33.0, "elevation_deg": 5.0, "times": [0.0, 1.0]}
    save_gaussians(tmp_path / GAUSSIANS_FILE, state)
    assert (tmp_path / GAUSSIANS_FILE).read_bytes()[:8] != b"PK\x03\x04\x00\x00\x08\x08"  # not a torch zip
    from safetensors import safe_open

    with safe_open(str(tmp_path / GAUSSIANS_FILE), framework="pt") as f:
        assert set(f.keys()) == set(state["params"]) and list(f.metadata()) == ["d2"]  # one key: a fixed order
    back, orbit = load_gaussians(tmp_path)  # a folder: the file in it
    assert orbit == state["orbit"] and back.sh_degree == g.sh_degree and back.time_basis == g.time_basis
    for k, v in back.export_state()["params"].items():
        assert torch.equal(v, state["params"][k]), k
    # an older fit's gaussians.pt is still read; the safetensors file wins when both exist
    legacy = tmp_path / "old"
    save_tensor(legacy / "gaussians.pt", state)
    assert find_gaussians(legacy) == legacy / "gaussians.pt"
    old, _ = load_gaussians(legacy / "gaussians.pt")
    assert torch.equal(old.means, back.means)
    assert find_gaussians(tmp_path) == tmp_path / GAUSSIANS_FILE
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no gaussians.safetensors"):
        load_gaussians(tmp_path / "empty")


def test_matrix_fit_measure_sees_lost_motion(tmp_path: Path) -> None:
    """Renders of the Gaussians themselves as the matrix: PSNR at the cap and the motion kept; the
    same Gaussians frozen at one time: the motion is gone and the PSNR drops."""
    from d2.stages.cameras import frame_times, orbit_cameras
    from d2.stages.fit import write_matrix
    from d2.stages.fit_check import measure_matrix_fit

    g = procedural_gaussians(40, seed=4)
    with torch.no_grad():
        g.quats_l[:, 1] = 0.4  # every Gaussian moves along x over time
        g.quats_r[:, 1] = 0.4
    spec = OrbitSpec()
    az, times = [0.0, 90.0, 180.0], frame_times(4)
    imgs = torch.stack([render_views(g, [a] * 4, times, spec, 24, backend="torch") for a in az])  # [V, F, 3, H, W]
    write_matrix(tmp_path / "matrix", imgs, az, times, spec)
    state = g.export_state()
    save_gaussians(tmp_path / "fit" / GAUSSIANS_FILE, state)
    m = measure_matrix_fit(tmp_path / "fit" / GAUSSIANS_FILE, tmp_path / "matrix", backend="torch")
    assert m["matrix_psnr"] > 40 and len(m["matrix_psnr_per_view"]) == 3 and len(m["matrix_psnr_per_frame"]) == 4
    assert m["motion_matrix"] > 0.005 and abs(m["motion_fit"] - m["motion_matrix"]) < 0.2 * m["motion_matrix"]
    with torch.no_grad():  # frozen: no temporal tilt, no colour change
        g.quats_l.copy_(torch.tensor([1.0, 0, 0, 0]).expand(40, 4))
        g.quats_r.copy_(g.quats_l)
        g.time_coefs.zero_()
    save_gaussians(tmp_path / "frozen" / GAUSSIANS_FILE, g.export_state())
    f = measure_matrix_fit(tmp_path / "frozen" / GAUSSIANS_FILE, tmp_path / "matrix", backend="torch")
    assert f["motion_fit"] < 0.1 * m["motion_matrix"] and f["matrix_psnr"] < m["matrix_psnr"] - 10

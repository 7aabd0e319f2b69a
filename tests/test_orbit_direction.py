"""Which way the orbit turns (docs/method.md, "Which way the orbit turns").

Pinned here: an azimuth means one camera everywhere in the project. The angle the multi-view
prior receives for orbit view v, the camera the fit places view v at and the camera an
evaluation view of the same azimuth is rendered from are one camera; azimuth grows towards the
input view's right (counter-clockwise seen from +z), so eval_0 (-75 deg) looks at the side that
is on the LEFT of the input frame and eval_2 (105 deg) at the right-hand side, from behind.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from d2.eval.protocol import Protocol
from d2.stages.cameras import OrbitSpec, orbit_azimuths, orbit_cameras
from d2.stages.export import render_views
from d2.stages.gaussians import Gaussians4D, rgb_to_sh_dc
from d2.stages.priors import PriorsConfig, load_priors

V = 21  # SV3D_p's orbit
RES = 64


def _angle_gap(a: float, b: float, period: float = 2 * math.pi) -> float:
    """|a - b| on the circle."""
    return abs((a - b + period / 2) % period - period / 2)


def _camera_centre(viewmat: torch.Tensor) -> torch.Tensor:
    r, t = viewmat[:3, :3].double(), viewmat[:3, 3].double()
    return -r.T @ t


def test_sv3d_view_v_and_the_evaluation_camera_of_its_azimuth_are_one_camera():
    """Orbit view v: the prior's azimuth id, the fit's camera and the evaluation camera of that azimuth."""
    az = orbit_azimuths(V)  # what the conditions stage records and the sampler passes on
    # Stability's sv3d_p sampling script: deg2rad(((v + 1) 360 / V) mod 360) from the input view (the last
    # view, 0 there); the authors' main.py sets the last to 2 pi. Re-derived, not read from our code:
    script = [math.radians(((v + 1) * 360.0 / V) % 360.0) for v in range(V)]
    script[-1] = 2 * math.pi
    _, prior = load_priors(PriorsConfig(backend="tiny"))  # (video, multi-view)
    img = torch.rand(1, 3, prior.resolution, prior.resolution, generator=torch.Generator().manual_seed(0))
    ids = prior.condition(img, cond_aug=0.0, azimuths_deg=az, elevations_deg=0.0).added_ids[0].cpu()  # [V, 3]
    assert torch.allclose(ids[:, 2].double(), torch.tensor(script, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(ids[:, 1], torch.full((V,), math.pi / 2))  # polar = 90 deg - elevation 0
    spec = OrbitSpec(elevation_deg=0.0)
    fit_vm, fit_k = orbit_cameras(az, spec, RES, RES)  # d2/stages/fit.py: view v's camera
    for v in range(V):
        c = _camera_centre(fit_vm[v])
        assert _angle_gap(math.atan2(c[1].item(), c[0].item()), script[v]) < 1e-6
        # the evaluation path takes the azimuth in either form (-75 or 285): the same camera
        for a in (az[v], az[v] - 360.0):
            ev_vm, ev_k = orbit_cameras([a], spec, RES, RES)
            assert torch.allclose(ev_vm[0], fit_vm[v], atol=1e-5) and torch.equal(ev_k[0], fit_k[v])
    # the benchmark's views, as matrix directions: eval_k at azimuth a is the orbit direction a mod 360
    for a in Protocol.consistent4d().eval_azimuths_deg:
        c = _camera_centre(orbit_cameras([a], spec, RES, RES)[0][0])
        assert _angle_gap(math.degrees(math.atan2(c[1].item(), c[0].item())), a, 360.0) < 1e-4


def _markers() -> Gaussians4D:
    """A red Gaussian at +y and a blue one at -y, both at the equator, seen from t = 0.5."""
    g = Gaussians4D(2, sh_degree=0, time_basis=0)
    with torch.no_grad():
        g.means.copy_(torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.0, -0.5, 0.0, 0.5]]))
        g.log_scales.copy_(torch.log(torch.tensor([[0.08, 0.08, 0.08, 10.0]] * 2)))
        g.opacity_logits.fill_(6.0)
        g.sh_dc.copy_(rgb_to_sh_dc(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])))
    return g


def _column(img: torch.Tensor, channel: int) -> tuple[float, int]:
    """(mean column, pixel count) of the pixels where ``channel`` dominates: [3, H, W] on white."""
    x = img.numpy()
    other = [c for c in range(3) if c != channel]
    mask = (x[channel] > 0.5) & (x[other[0]] < 0.4) & (x[other[1]] < 0.4)
    cols = np.nonzero(mask)[1]
    return (float(cols.mean()) if cols.size else float("nan")), int(cols.size)


def test_azimuth_grows_towards_the_input_views_right():
    """Rendered through the evaluation path (render_views): at azimuth 0 (the input view) +y is on the
    right of the image; the camera at +90 faces +y, the one at -90 faces -y; the marker nearer the camera
    (the larger one) is the input's left (-y) at eval_0 (-75 deg) and its right (+y) at eval_1 (15 deg)
    and eval_2 (105 deg); at eval_3 (195 deg), from behind, left and right are swapped."""
    g = _markers()
    spec = OrbitSpec(elevation_deg=0.0)
    azimuths = [0.0, 90.0, -90.0] + list(Protocol.consistent4d().eval_azimuths_deg)  # -75, 15, 105, 195
    assert azimuths[3:] == [-75.0, 15.0, 105.0, 195.0]
    imgs = render_views(g, azimuths, [0.5] * len(azimuths), spec, RES, backend="torch")
    red = [_column(im, 0) for im in imgs]  # the marker at +y
    blue = [_column(im, 2) for im in imgs]  # the marker at -y
    mid = RES / 2
    assert red[0][0] > mid + 16 and blue[0][0] < mid - 16 and red[0][1] == blue[0][1]  # the input view
    assert abs(red[1][0] - mid) < 1 and blue[1][1] == 0  # +90: +y in front, -y hidden behind it
    assert abs(blue[2][0] - mid) < 1 and red[2][1] == 0  # -90: the reverse
    assert blue[3][1] > 2 * red[3][1]  # eval_0: the input's left side faces the camera
    assert red[4][1] > blue[4][1]  # eval_1: turned a little towards the input's right
    assert red[5][1] > 2 * blue[5][1]  # eval_2: the input's right side, from behind
    assert red[6][0] < mid < blue[6][0] and blue[6][1] > red[6][1]  # eval_3: from behind, a little left


@pytest.mark.parametrize("azimuth", [-75.0, 105.0])
def test_a_mirrored_orbit_would_be_another_camera(azimuth):
    """What a mirrored convention would change: the camera at -a is not the camera at a (its
    reflection in the input view's plane), so a flip of the orbit's direction cannot go unnoticed."""
    spec = OrbitSpec(elevation_deg=0.0)
    vm, _ = orbit_cameras([azimuth, -azimuth], spec, RES, RES)
    a, b = _camera_centre(vm[0]), _camera_centre(vm[1])
    assert torch.allclose(a[0], b[0], atol=1e-6) and torch.allclose(a[1], -b[1], atol=1e-6)
    assert (a - b).norm() > 1.0

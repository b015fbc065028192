"""Feature-space maps (featinv.analysis.feature_maps): ridge fits that recover known maps, streamed sums equal to
the in-memory solution, a spatial move that a per-position map cannot make, save/load, and refusals."""
import subprocess
import sys

import pytest
import torch

from featinv.analysis.feature_maps import NormalEquations, fit_map
from featinv.analysis.map_files import check_map_fits, load_map, read_map_spec, save_map
from featinv.analysis.map_scores import feature_scores, linear_geometry


def batches_of(x, y, size):
    return lambda: zip(x.split(size), y.split(size))


def r2(pred, y):
    return 1 - (pred - y).square().sum() / (y - y.mean(dim=(0, 2, 3), keepdim=True)).square().sum()


def test_linear_map_recovers_a_known_affine_map():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(12, 8, generator=g), torch.randn(12, generator=g)
    x = torch.randn(300, 8, 3, 3, generator=g)
    y = torch.einsum("oc,bchw->bohw", w, x) + b[:, None, None] + 0.01 * torch.randn(300, 12, 3, 3, generator=g)
    fmap = fit_map("linear", batches_of(x[:240], y[:240], 50), (x[240:], y[240:]))
    assert torch.allclose(fmap.matrix, w, atol=5e-3) and torch.allclose(fmap.bias, b, atol=5e-3)
    held = torch.randn(50, 8, 3, 3, generator=g)
    truth = torch.einsum("oc,bchw->bohw", w, held) + b[:, None, None]
    assert r2(fmap(held), truth) > 0.999
    assert feature_scores(fmap(held), truth)["r2"] > 0.999


def test_streamed_ridge_equals_the_in_memory_solution():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(1000, 16, generator=g) * 3 + 1, torch.randn(1000, 5, generator=g)
    streamed = NormalEquations(16, 5)
    for xs, ys in zip(x.split(97), y.split(97)):
        streamed.add(xs, ys)
    (_, w, b), = streamed.solve([1e-2])
    xd, yd = x.double(), y.double()
    xc, yc = xd - xd.mean(0), yd - yd.mean(0)
    cov = xc.T @ xc / len(x)
    lam = 1e-2 * torch.linalg.eigvalsh(cov).mean()
    w_ref = torch.linalg.solve(cov + lam * torch.eye(16, dtype=torch.float64), xc.T @ yc / len(x))
    assert torch.allclose(w, w_ref, atol=1e-6)
    assert torch.allclose(b, yd.mean(0) - xd.mean(0) @ w_ref, atol=1e-6)
    pred = xd @ w + b
    assert streamed.sse(w, b) == pytest.approx(float((yd - pred).square().sum()), rel=1e-6)
    assert streamed.sst() == pytest.approx(float(yc.square().sum()), rel=1e-6)


def test_identity_scores_the_unmapped_maps():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 6, 2, 2, generator=g)
    y = x + 0.5 * torch.randn(40, 6, 2, 2, generator=g)
    fmap = fit_map("identity", batches_of(x, y, 10), (x, y))
    assert torch.equal(fmap(x), x)
    assert feature_scores(fmap(x), y)["r2"] == pytest.approx(float(r2(x, y)), abs=1e-5)


def test_a_spatial_move_defeats_the_per_position_map():
    """A horizontal flip of a 2-wide grid moves each vector to the other cell: no W·x + b per position can do that;
    a 3x3 convolution can (with zero padding each column sees its partner on one side only), and a transformer
    over the tokens learns it."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(600, 6, 2, 2, generator=g)
    y = x.flip(-1)
    fit, val, test = slice(0, 400), slice(400, 500), slice(500, 600)
    scores = {}
    for kind, options in (("linear", {}), ("local", {}), ("global", dict(width=32, max_epochs=150))):
        fmap = fit_map(kind, batches_of(x[fit], y[fit], 50), (x[val], y[val]), **options)
        with torch.no_grad():
            scores[kind] = feature_scores(fmap(x[test]), y[test])["r2"]
    assert scores["linear"] < 0.5
    assert scores["local"] > 0.99 and scores["global"] > scores["linear"] + 0.3, scores


def test_save_load_gives_the_same_map_and_refuses_other_shapes(tmp_path):
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(80, 4, 2, 2, generator=g), torch.randn(80, 4, 2, 2, generator=g)
    for kind in ("linear", "local", "global"):
        options = dict(width=16, max_epochs=3) if kind == "global" else {}
        fmap = fit_map(kind, batches_of(x[:60], y[:60], 20), (x[60:], y[60:]), **options)
        path = save_map(fmap, tmp_path / f"{kind}.safetensors", about={"source": "net B"})
        back = load_map(path)
        with torch.no_grad():
            assert torch.equal(back(x), fmap(x))
        assert read_map_spec(path)["kind"] == kind and back.about == {"source": "net B"}
        with pytest.raises(ValueError, match=r"takes 4x2x2 maps \(made for net B\), but net C gives 8x2x2"):
            check_map_fits(back, 8, (2, 2), 4, "net C", "the decoder", str(path))
        with pytest.raises(ValueError, match="gives 4-channel maps, but the decoder inverts 64 channels"):
            check_map_fits(back, 4, (2, 2), 64, "net B", "the decoder", str(path))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="junk.safetensors: not a readable safetensors file"):
        read_map_spec(tmp_path / "junk.safetensors")


def test_a_map_across_grids_resamples_the_input():
    """Another network's 3x3 map into a 2x2 target: bilinear resampling to the target grid, then the map."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(200, 5, 3, 3, generator=g)
    w = torch.randn(7, 5, generator=g)
    y = torch.einsum("oc,bchw->bohw", w, torch.nn.functional.interpolate(x, size=(2, 2), mode="bilinear"))
    fmap = fit_map("linear", batches_of(x[:150], y[:150], 50), (x[150:], y[150:]))
    assert fmap(x[:3]).shape == (3, 7, 2, 2)
    assert feature_scores(fmap(x[150:]), y[150:])["r2"] > 0.999
    geom = linear_geometry(fmap, x[150:])
    assert 1 <= geom["effective_rank"] <= 5 and geom["bias_share"] < 1e-3


def test_the_registry_lists_every_map_type_without_torch():
    code = ("import sys; from featinv.registry import MAP_TYPES; assert 'torch' not in sys.modules; "
            "print(','.join(MAP_TYPES))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "identity,linear,local,global"

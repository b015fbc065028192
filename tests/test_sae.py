"""Sparse autoencoders: exact sparsity, FVU against latents, sparse = dense decoding, gradients against a dense
reference, AuxK against dead latents, determinism and round trips, unit-norm atoms, shard reading."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from featinv.analysis.sae import fvu, sae_metrics, sparse_mixture, train_sae
from featinv.analysis.shards import shard_batches
from featinv.demo.digits import load_digits_split, make_extractor, rgb, train_classifier
from featinv.nets.sae import SparseAutoencoder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These SAEs are small: one thread beats two (thread hand-offs cost more than the matmuls)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loader(x: torch.Tensor, batch: int):
    """epoch -> x's rows in an order drawn from the epoch, in batches."""
    return lambda epoch: x[torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))].split(batch)


def digit_maps() -> tuple[torch.Tensor, torch.Tensor]:
    """The demo's kind of feature maps: its digits CNN (8 epochs, ~3 s) on the digits split; per-location channel
    vectors (64 ReLU channels, ~20 never active) of the training and held-out digits, (5748, 64) and (1440, 64)."""
    data = load_digits_split(8)
    extractor = make_extractor(train_classifier(data, 8, 0, torch.device("cpu")), 8)
    with torch.no_grad():
        return tuple(extractor(rgb(data[k])).permute(0, 2, 3, 1).reshape(-1, 64) for k in ("x_train", "x_test"))


@pytest.fixture(scope="module")
def mixture():
    x, atoms = sparse_mixture(6000, 32, features=128, active=4, noise=0.05, seed=0)
    return x[:5000], x[5000:], atoms


@pytest.fixture(scope="module")
def trained(mixture):
    train, _, _ = mixture
    return {kind: train_sae(loader(train, 250), 32, 128, 4, kind, epochs=6) for kind in ("topk", "batchtopk")}


def test_topk_keeps_exactly_k_per_row(trained, mixture):
    sae, stats = trained["topk"]
    codes = sae.encode(mixture[1])
    assert (codes > 0).sum(1).tolist() == [4] * len(codes)
    assert (codes >= 0).all() and stats["steps"] == 6 * 20 and stats["vectors"] == 6 * 5000


def test_batchtopk_keeps_k_on_average(trained, mixture):
    sae, _ = trained["batchtopk"]
    train, held_out, _ = mixture
    sae.train()
    codes = sae.encode(train[:250])  # training mode: the batch's top 250 * 4
    assert (codes > 0).sum().item() == 250 * 4 and (codes > 0).sum(1).max() > 4  # shared budget, uneven rows
    sae.eval()
    assert sae.threshold > 0
    l0 = sae_metrics(sae, held_out)["l0"]  # eval mode: the threshold, independent of the batch
    assert abs(l0 - 4) < 1.0, l0
    torch.testing.assert_close(sae.encode(held_out[:7]), sae.encode(held_out)[:7])  # no batch dependence


def test_fvu_falls_as_latents_grow(mixture):
    train, held_out, _ = mixture
    fvus = [sae_metrics(train_sae(loader(train, 250), 32, m, 4, epochs=4)[0], held_out)["fvu"] for m in (16, 64, 256)]
    assert fvus[0] > fvus[1] > fvus[2], fvus
    assert fvus[2] < 0.5 * fvus[0]


def test_fvu_and_metrics_against_direct_formulas(trained, mixture):
    sae, _ = trained["topk"]
    x = mixture[1]
    codes, x_hat = sae(x)
    expected = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    m = sae_metrics(sae, iter(x.split(300)), batch_size=128)  # an iterable of batches, re-split
    assert m["fvu"] == pytest.approx(expected.item(), rel=1e-5)
    assert fvu(x, x_hat).item() == pytest.approx(m["fvu"], rel=1e-5)
    assert m["l0"] == 4 and m["vectors"] == len(x)
    assert m["dead"] == int(((codes > 0).sum(0) == 0).sum()) and m["dead_share"] == m["dead"] / 128


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_decode_is_affine_and_sparse_equals_dense(kind):
    sae = SparseAutoencoder(16, 40, 3, kind, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_pre.normal_()
    g = torch.Generator().manual_seed(1)
    c1, c2 = (torch.rand(9, 40, generator=g) * (torch.rand(9, 40, generator=g) < 0.1) for _ in range(2))
    for c in (c1, c2, 0.3 * c1 + 0.7 * c2, torch.zeros(9, 40)):  # the mix has more than top_k non-zeros per row
        torch.testing.assert_close(sae.decode(c), c @ sae.W_dec + sae.b_pre, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sae.decode(0.3 * c1 + 0.7 * c2), 0.3 * sae.decode(c1) + 0.7 * sae.decode(c2),
                               atol=1e-6, rtol=1e-6)
    codes, x_hat = sae(torch.randn(9, 16, generator=g))
    torch.testing.assert_close(x_hat, codes @ sae.W_dec + sae.b_pre, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_sparse_backward_matches_dense_reference(kind):
    sae = SparseAutoencoder(12, 40, 3, kind, generator=torch.Generator().manual_seed(1)).double()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in (sae.b_pre, sae.b_enc, sae.W_enc):
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.double))
    x = torch.randn(7, 12, generator=g, dtype=torch.double)
    codes, x_hat = sae(x)
    ours = torch.autograd.grad(((x_hat - x) ** 2).sum() + codes.sum(), list(sae.parameters()))
    kept = sae.pre_codes(x) * (codes > 0)  # the same selection through dense autograd
    ref_hat = kept @ sae.W_dec + sae.b_pre
    ref = torch.autograd.grad(((ref_hat - x) ** 2).sum() + kept.sum(), list(sae.parameters()))
    for (name, _), a, b in zip(sae.named_parameters(), ours, ref):
        torch.testing.assert_close(a, b, msg=name)


def test_auxk_keeps_latents_alive_on_digit_maps():
    train, held_out = digit_maps()
    share = {}
    for aux_k in (0, None):  # 0: no remedy; None: AuxK with aux_k = d // 2 (measured: ~0.5 and ~0.14)
        sae, _ = train_sae(loader(train, 256), 64, 256, 8, epochs=60, aux_k=aux_k)
        share[aux_k] = sae_metrics(sae, held_out)["dead_share"]
    assert share[None] <= 0.2 and share[0] >= 0.4, share


def test_dead_latents_revived_or_reported(trained, mixture):
    train, held_out, _ = mixture
    sae, _ = trained["topk"]
    planted = SparseAutoencoder.from_tensors(sae.state_dict(), 4, "topk")
    with torch.no_grad():
        planted.W_enc[0] *= 0.1    # soft-dead: never in the top k, still reached by AuxK's gradient
        planted.b_enc[1] = -1e4    # hard-dead: its pre-activation never reaches 0, no gradient reaches it
    assert (planted.encode(train)[:, :2] == 0).all()
    runs = {aux_k: train_sae(loader(train, 250), 32, 128, 4, epochs=5, aux_k=aux_k, dead_after=1000, init=planted)
            for aux_k in (0, None)}
    fired = {aux_k: (sae.encode(held_out) > 0).any(0) for aux_k, (sae, _) in runs.items()}
    assert fired[None][0] and not fired[0][0]  # AuxK revives the soft-dead latent; without it it stays dead
    assert not fired[None][1] and not fired[0][1]
    for sae, stats in runs.values():  # the hard-dead one is reported by training and by the metrics
        assert stats["dead"] >= 1 and sae_metrics(sae, held_out)["dead"] >= 1


def test_deterministic_on_cpu_and_round_trip(mixture):
    train, held_out, _ = mixture
    runs = [train_sae(loader(train, 500), 32, 64, 4, "batchtopk", epochs=2, seed=s)[0] for s in (3, 3, 4)]
    a, b, c = (r.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["W_dec"], c["W_dec"])
    loaded = SparseAutoencoder.from_tensors({k: v.clone() for k, v in a.items()}, 4, "batchtopk").eval()
    assert torch.equal(loaded.encode(held_out), runs[0].encode(held_out))
    with pytest.raises(ValueError, match="missing 'b_enc'.*'W_enc' has shape"):
        SparseAutoencoder.from_tensors({**{k: v for k, v in a.items() if k != "b_enc"}, "W_enc": a["W_enc"][:5]}, 4,
                                       "topk")


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_decoder_rows_stay_unit_norm(trained, kind):
    norms = trained[kind][0].W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="kind"):
        SparseAutoencoder(8, 16, 2, "relu")
    with pytest.raises(ValueError, match="top_k"):
        SparseAutoencoder(8, 16, 17)
    with pytest.raises(ValueError, match=r"expected \(B, 8\)"):
        train_sae(lambda e: [torch.randn(4, 9)], 8, 16, 2)


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_compiles_without_graph_breaks(kind):
    """The training forward pass (fixed shapes for both kinds) is one graph."""
    sae = SparseAutoencoder(16, 64, 4, kind, generator=torch.Generator().manual_seed(0))
    x = torch.randn(32, 16)
    compiled = torch.compile(sae, backend="aot_eager", fullgraph=True)
    codes, x_hat = compiled(x)
    ref_codes, ref_hat = sae(x)
    assert torch.equal(codes, ref_codes) and torch.allclose(x_hat, ref_hat)
    x_hat.square().sum().backward()
    assert sae.W_enc.grad is not None and sae.W_dec.grad is not None


def write_shards(folder, parts):
    for i, part in enumerate(parts):
        np.save(folder / f"shard_{i}.npy", part)


def test_shard_batches_read_every_vector_once(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 6)).astype(np.float32) for n in (130, 7, 0, 260)]
    parts[1] = parts[1].astype(np.float16)
    write_shards(tmp_path, parts)
    batches, facts = shard_batches(tmp_path, batch_size=32, seed=5)
    assert facts == {"vectors": 397, "d": 6, "shards": 4}
    everything = np.concatenate([p.astype(np.float32) for p in parts])
    orders = []
    for epoch in (0, 1):
        got = list(batches(epoch))
        assert all(b.shape == (32, 6) and b.dtype == torch.float32 for b in got[:-1]) and len(got[-1]) == 397 % 32
        got = torch.cat(got).numpy()
        assert np.array_equal(np.sort(got, axis=0), np.sort(everything, axis=0))
        assert len({row.tobytes() for row in got}) == 397  # exactly once: no row repeated
        orders.append(got)
    assert not np.array_equal(orders[0], orders[1]) and np.array_equal(torch.cat(list(batches(1))).numpy(), orders[1])
    seen = []
    _, stats = train_sae(batches, 6, 16, 2, epochs=2, vectors=facts["vectors"], progress=lambda *a: seen.append(a))
    assert seen[-1] == (2 * 397, 2 * 397) and len(seen) == stats["steps"] == 2 * 13


def test_shard_problems_are_one_line_errors_naming_the_file(tmp_path):
    write_shards(tmp_path, [np.zeros((50, 6), np.float32), np.zeros((40, 5), np.float32)])
    with pytest.raises(ValueError, match=r"shard_1\.npy: width 5") as err:
        shard_batches(tmp_path, 16)
    assert "\n" not in str(err.value)
    (tmp_path / "shard_1.npy").unlink()
    path = tmp_path / "shard_0.npy"
    path.write_bytes(path.read_bytes()[:-9])
    with pytest.raises(ValueError, match=r"shard_0\.npy: truncated") as err:
        shard_batches(tmp_path, 16)
    assert "\n" not in str(err.value)
    np.save(path, np.zeros((5, 6), np.int64))
    with pytest.raises(ValueError, match=r"shard_0\.npy: int64"):
        shard_batches(tmp_path, 16)
    path.write_bytes(b"not numpy")
    with pytest.raises(ValueError, match=r"shard_0\.npy: not a readable \.npy"):
        shard_batches(tmp_path, 16)
    path.unlink()
    with pytest.raises(ValueError, match="no .npy shards"):
        shard_batches(tmp_path, 16)


def test_written_shards_stream_back_and_a_missing_or_foreign_file_is_named(tmp_path):
    from featinv.analysis import shards

    maps = torch.randn(7, 6, 3, 3)  # 63 vectors, 20 a shard: 4 shards, the last of 3 rows
    facts = shards.write_shards([maps[:4], maps[4:]], tmp_path / "s", shard_rows=20)
    assert facts == {"vectors": 63, "d": 6, "shards": 4}
    batches, read = shard_batches(tmp_path / "s", batch_size=16)
    assert read == facts
    got = torch.cat(list(batches(0)))
    want = maps.permute(0, 2, 3, 1).reshape(-1, 6)
    assert torch.equal(got[got[:, 0].argsort()], want[want[:, 0].argsort()])   # every vector, once
    with pytest.raises(ValueError, match="not empty"):   # nothing overwritten
        shards.write_shards([maps], tmp_path / "s")
    np.save(tmp_path / "s" / "extra.npy", np.zeros((2, 6), np.float32))
    with pytest.raises(ValueError, match=r"extra\.npy is not listed in shards\.json"):
        shard_batches(tmp_path / "s", 16)
    (tmp_path / "s" / "extra.npy").unlink()
    np.save(tmp_path / "s" / "shard_00001.npy", np.zeros((5, 6), np.float32))
    with pytest.raises(ValueError, match=r"shard_00001\.npy: 5 rows, but shards\.json lists 20"):
        shard_batches(tmp_path / "s", 16)
    (tmp_path / "s" / "shard_00002.npy").unlink()
    with pytest.raises(ValueError, match=r"shard_00002\.npy \(listed in shards\.json\) is missing") as err:
        shard_batches(tmp_path / "s", 16)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trains_on_cuda_with_bf16_autocast(mixture):
    train, held_out, _ = mixture
    sae, stats = train_sae(loader(train, 250), 32, 128, 4, epochs=2, device="cuda")
    assert sae.W_dec.device.type == "cpu" and (sae.encode(held_out) > 0).sum(1).eq(4).all()
    assert stats["loss"] < 0.9

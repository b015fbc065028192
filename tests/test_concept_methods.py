"""The concept methods as registry classes: the sparse autoencoders beside the scikit-learn methods, one basis
file for all, held-out quality, and the atlas's choice of concepts to draw."""
from __future__ import annotations

import pytest
import torch

from featinv.analysis.concept_scores import completeness
from featinv.analysis.concepts import ConceptBasis, check_k, fit_concepts
from featinv.analysis.concepts_report import drawn


@pytest.fixture(scope="module")
def maps():
    """(60, 16, 3, 3) maps: each location a sparse non-negative mix of 24 planted unit directions plus noise."""
    g = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(24, 16, generator=g), dim=1)
    codes = torch.rand(60 * 9, 24, generator=g) * (torch.rand(60 * 9, 24, generator=g) < 0.12)
    x = codes @ atoms + 0.01 * torch.randn(60 * 9, 16, generator=g)
    return x.view(60, 3, 3, 16).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("method", ["topk", "batchtopk"])
def test_an_sae_is_a_basis_its_file_round_trips(method, maps, tmp_path):
    basis = fit_concepts(maps, 32, method, seed=0, passes=150, batch_size=256, top_k=3)
    assert basis.method == method and basis.params["top_k"] == 3 and {"W_enc", "b_enc"} <= set(basis.encoder)
    assert torch.allclose(basis.atoms.norm(dim=1), torch.ones(32), atol=1e-5)  # unit decoder rows
    codes = basis.encode(maps)
    l0 = (codes != 0).sum(1).float()
    if method == "topk":  # ReLU after TopK: a location whose 3rd-best latent is not positive has fewer
        assert (l0 <= 3).all() and float(l0.mean()) > 2.8
    else:
        assert abs(float(l0.mean()) - 3) < 1.5  # the threshold: 3 on average
    quality = completeness(basis, maps, codes=codes)
    assert quality["fvu"] < 0.5 and quality["fvu"] == pytest.approx(1 - quality["variance_explained"])
    loaded = ConceptBasis.load(basis.save(tmp_path / "sae.safetensors"))
    assert loaded.params == basis.params and torch.equal(loaded.encode(maps), codes)
    assert torch.allclose(loaded.decode(codes), basis.decode(codes))


def test_an_sae_may_have_more_concepts_than_vectors_the_factorisations_may_not(maps):
    few = maps[:2]  # 18 vectors
    basis = fit_concepts(few, 40, "topk", seed=0, passes=5, batch_size=64, top_k=2)
    assert basis.k == 40
    with pytest.raises(ValueError, match=r"-k: k=40 exceeds the 18 feature-map locations.*sparse autoencoders"):
        check_k(40, "kmeans", 18, 16)
    with pytest.raises(ValueError, match=r"-k: k=20 exceeds the 16 channels.*sparse autoencoders"):
        check_k(20, "nmf", 540, 16)


def test_an_sae_reads_every_vector_of_a_one_shot_stream(maps):
    """A stream read once (passes 1): every batch trains, none is lost to the peek at its first one."""
    batches = [maps[i:i + 6] for i in range(0, 60, 6)]  # 10 batches of 54 vectors
    basis = fit_concepts(iter(batches), 32, "topk", seed=0, passes=1, batch_size=128, top_k=3)
    assert basis.stats["vectors"] == 540 and basis.stats["sae"]["vectors"] == 540


def test_a_stream_smaller_than_k_is_refused_before_scikit_learn(maps):
    with pytest.raises(ValueError, match=r"^-k: k=25 exceeds the 18 feature-map locations"):
        fit_concepts([maps[:1], maps[1:2]], 25, "kmeans", passes=1)


def test_quality_counts_dead_and_active_concepts(maps):
    atoms = torch.eye(16)[:4]
    basis = ConceptBasis(atoms, "pca", torch.zeros(16))
    codes = basis.encode(maps)
    codes[:, 3] = 0  # concept 3 never active
    q = completeness(basis, maps, codes=codes)
    assert q["dead"] == 1 and q["dead_share"] == 0.25
    assert q["l0"] == pytest.approx(float((codes != 0).sum(1).float().mean()))


def test_the_atlas_draws_the_top_concepts_or_those_asked_for():
    removal = torch.tensor([[0.1, 0.0], [3.0, 0.2], [float("nan"), 0.5], [0.0, 2.0]])  # (k, classes)
    assert drawn(4, removal, None) == {0, 1, 2, 3}  # up to 20: all
    assert drawn(4, removal, 2) == {1, 3}           # the top 2 by their largest logit drop
    assert drawn(4, removal, [0, 2]) == {0, 2}
    with pytest.raises(ValueError, match="--draw: concept 7 out of range: the basis has 4 concepts"):
        drawn(4, removal, [7])
    assert len(drawn(100, torch.rand(100, 3), None)) == 10


def overcomplete_sae(maps, kind: str, latents: int = 32, top_k: int = 3):
    """An Overcomplete SAE trained briefly on the maps' vectors (its own train_sae), in eval mode."""
    sae_module = pytest.importorskip("overcomplete.sae", reason="overcomplete needs Python < 3.13 and matplotlib < 3.9 "
                                     "(the test extra installs both where it can)")
    torch.manual_seed(0)
    x = maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])
    sae = (sae_module.TopKSAE if kind == "topk" else sae_module.BatchTopKSAE)(x.shape[1], latents, top_k=top_k)
    loader = torch.utils.data.DataLoader(x, batch_size=128, shuffle=True)
    sae_module.train_sae(sae, loader, lambda x, x_hat, *rest: (x - x_hat).square().mean(),
                         torch.optim.Adam(sae.parameters(), lr=1e-3), nb_epochs=3, monitoring=0)
    return sae.eval(), x


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_an_imported_overcomplete_sae_encodes_decodes_and_removes_as_overcomplete(kind, maps, tmp_path):
    """Parity that could fail: codes, reconstructions and x - z_i D_i of the imported basis equal Overcomplete's."""
    from safetensors.torch import save_file

    from featinv.analysis.concept_edits import remove
    from featinv.analysis.concepts import method_of
    from featinv.checkpoint.overcomplete import overcomplete_to_sae, read_state

    sae, x = overcomplete_sae(maps, kind)
    path = tmp_path / "sae.pt"
    torch.save(sae.state_dict(), path)
    threshold = float(sae.running_threshold) if kind == "batchtopk" else None
    basis = method_of(kind).basis_from_sae(overcomplete_to_sae(read_state(path), kind, threshold), 3)
    with torch.no_grad():
        _, z = sae.encode(x)
        x_hat, D = sae.decode(z), sae.get_dictionary()
    codes = basis.encode(maps)
    flat = codes.permute(0, 2, 3, 1).reshape(-1, basis.k)
    assert torch.allclose(flat, z, atol=1e-6)
    decoded = basis.decode(codes).permute(0, 2, 3, 1).reshape(-1, maps.shape[1])
    assert torch.allclose(decoded, x_hat, atol=1e-6)
    i = int(z.count_nonzero(0).argmax())  # the most active concept
    removed = remove(maps, basis, i, codes).permute(0, 2, 3, 1).reshape(-1, maps.shape[1])
    assert torch.allclose(removed, x - z[:, i:i + 1] * D[i], atol=1e-6)
    save_file(sae.state_dict(), str(tmp_path / "sae.safetensors"))  # the same from a safetensors file
    again = method_of(kind).basis_from_sae(overcomplete_to_sae(read_state(tmp_path / "sae.safetensors"), kind,
                                                               threshold), 3)
    assert torch.equal(again.encode(maps), codes)


def test_an_import_that_is_not_a_plain_sae_is_one_line(tmp_path):
    from featinv.checkpoint.overcomplete import overcomplete_to_sae, read_state

    torch.save({"encoder.mlp_blocks.0.weight": torch.zeros(2, 2)}, tmp_path / "deep.pt")
    with pytest.raises(ValueError, match=r"deep.pt: not an Overcomplete TopK/BatchTopK SAE .*missing encoder"):
        overcomplete_to_sae(read_state(tmp_path / "deep.pt"), "topk", source=str(tmp_path / "deep.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="junk.pt: not a checkpoint: neither safetensors"):  # as every checkpoint
        read_state(tmp_path / "junk.pt")
    state = {"encoder.final_block.0.weight": torch.zeros(4, 2), "encoder.final_block.0.bias": torch.zeros(4),
             "dictionary._weights": torch.ones(4, 2)}
    with pytest.raises(ValueError, match="running_threshold"):
        overcomplete_to_sae(state, "batchtopk")
    state["dictionary._weights"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="non-finite"):
        read_state(tmp_path / "nan.pt")


def test_an_imported_jumprelu_sae_encodes_and_decodes_as_overcomplete(maps, tmp_path):
    """JumpSAE: per-latent thresholds stored as logarithms; codes and reconstructions equal Overcomplete's."""
    sae_module = pytest.importorskip("overcomplete.sae", reason="overcomplete needs Python < 3.13 and matplotlib < 3.9 "
                                     "(the test extra installs both where it can)")
    from featinv.analysis.concepts import method_of
    from featinv.checkpoint.overcomplete import overcomplete_to_sae, read_state

    torch.manual_seed(0)
    sae = sae_module.JumpSAE(16, 32).eval()
    x = maps.permute(0, 2, 3, 1).reshape(-1, 16)
    with torch.no_grad():
        pre, _ = sae.encoder(x)
        sae.thresholds.copy_(pre.clamp_min(1e-3).quantile(0.8, dim=0).log())  # each latent on ~20 % of vectors
        _, z = sae.encode(x)
        x_hat = sae.decode(z)
    assert 0 < (z != 0).float().mean() < 0.5
    torch.save(sae.state_dict(), tmp_path / "jump.pt")
    basis = method_of("jumprelu").basis_from_sae(overcomplete_to_sae(read_state(tmp_path / "jump.pt"), "jumprelu"),
                                                 None)
    codes = basis.encode(maps)
    assert torch.allclose(codes.permute(0, 2, 3, 1).reshape(-1, 32), z, atol=1e-6)
    assert torch.allclose(basis.decode(codes).permute(0, 2, 3, 1).reshape(-1, 16), x_hat, atol=1e-6)
    basis.save(tmp_path / "jump.safetensors")
    assert torch.equal(ConceptBasis.load(tmp_path / "jump.safetensors").encode(maps), codes)
    with pytest.raises(ValueError, match="imports JumpReLU SAEs"):
        fit_concepts(maps, 8, "jumprelu")


def test_any_module_with_encode_and_an_affine_decode_is_a_basis(maps, tmp_path):
    """The Python route: an Overcomplete SAE object itself (encode -> (pre_codes, codes)) as a basis."""
    from featinv.analysis.concept_edits import set_code
    from featinv.analysis.concepts import basis_from_module

    sae, x = overcomplete_sae(maps, "topk")
    basis = basis_from_module(sae, 16)
    with torch.no_grad():
        _, z = sae.encode(x)
        x_hat = sae.decode(z)
    codes = basis.encode(maps)
    assert basis.k == 32 and torch.allclose(codes.permute(0, 2, 3, 1).reshape(-1, 32), z, atol=1e-6)
    assert torch.allclose(basis.decode(codes).permute(0, 2, 3, 1).reshape(-1, 16), x_hat, atol=1e-5)
    edited = set_code(maps, basis, 5, 2.0, codes=codes)  # an edit moves by (level - code) · atom
    assert torch.allclose(edited - maps, (2.0 - codes[:, 5:6]) * basis.atoms[5].view(1, -1, 1, 1), atol=1e-5)
    with pytest.raises(ValueError, match="cannot be saved"):
        basis.save(tmp_path / "module.safetensors")

    class NoDecode(torch.nn.Module):
        def encode(self, x):
            return x

    with pytest.raises(ValueError, match=r"^NoDecode: not a sparse autoencoder module: it has no decode\(\)"):
        basis_from_module(NoDecode(), 16)

    class Squared(NoDecode):
        def decode(self, z):
            return z ** 2

    with pytest.raises(ValueError, match="Squared.decode is not affine"):
        basis_from_module(Squared(), 16)

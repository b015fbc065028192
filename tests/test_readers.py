"""Tensor-file readers (issue 26): one finite check for all of them, folders and foreign featinv files named as
such, concept-count bounds per method up front, and offline backbones as one-line errors. Fast: no demo pair."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from featinv.analysis.concepts import METHODS, ConceptBasis, check_k, fit_concepts, resolve_method
from featinv.checkpoint import load as checkpoint_load
from featinv.checkpoint import tensor_files
from featinv.checkpoint.inspect import describe
from featinv.checkpoint.load import load_featinv, read_checkpoint
from featinv.checkpoint.tensor_files import check_finite, read_tensors
from featinv.config import WEIGHTS_FILE, BackboneConfig
from featinv.registry import CONCEPT_METHODS


def basis(atoms: torch.Tensor | None = None) -> ConceptBasis:
    """A 3-concept basis over 4 channels."""
    atoms = torch.eye(3, 4) if atoms is None else atoms
    return ConceptBasis(atoms, "nmf", torch.zeros(4), source="test")


@pytest.fixture()
def nan_basis(tmp_path):
    atoms = torch.eye(3, 4)
    atoms[0, :3] = float("nan")
    return basis(atoms).save(tmp_path / "concepts.safetensors")


# ----- 1. one finite check ----------------------------------------------------------------------------

def test_nan_basis_is_refused_naming_file_and_tensor(nan_basis):
    with pytest.raises(ValueError, match=r"concepts\.safetensors: 3 non-finite \(NaN/inf\) values in 1 tensor, "
                                         r"first 'atoms'") as err:
        ConceptBasis.load(nan_basis)
    assert "\n" not in str(err.value)


def test_nan_basis_is_refused_by_the_direction_parser(nan_basis):
    from featinv.analysis.directions import parse_direction

    with pytest.raises(ValueError, match=r"concepts\.safetensors: 3 non-finite .* first 'atoms'"):
        parse_direction(f"concept:{nan_basis}:0", pair=None)  # the basis is read before the pair is used


def test_checkpoints_and_other_files_share_one_check(tiny_sd, tmp_path):
    assert checkpoint_load.check_finite is tensor_files.check_finite
    sd = dict(tiny_sd)
    key = "control_model.input_hint_block.block.1.weight"  # a trainable tensor
    sd[key] = sd[key].clone()
    sd[key].view(-1)[:2] = torch.tensor([float("inf"), float("nan")])
    save_file(sd, tmp_path / "diverged.safetensors")
    with pytest.raises(ValueError, match=rf"diverged\.safetensors: 2 non-finite \(NaN/inf\) values in 1 tensor, "
                                         rf"first '{key}'; the checkpoint is broken") as err:
        load_featinv(tmp_path / "diverged.safetensors")
    assert "\n" not in str(err.value)
    check_finite({"a": torch.ones(2), "b": torch.arange(3)}, "fine")  # integers are never non-finite


def test_read_tensors_names_and_finite(tmp_path):
    path = tmp_path / "sae.safetensors"
    save_file({"W_enc": torch.ones(4, 8), "b_enc": torch.tensor([0.0, float("nan")])}, path, metadata={"a": "b"})
    tensors, metadata = read_tensors(path, kind="SAE", names=("W_enc",))
    assert list(tensors) == ["W_enc"] and metadata == {"a": "b"}  # only the named tensors are read and checked
    with pytest.raises(ValueError, match=r"sae\.safetensors: 1 non-finite \(NaN/inf\) value in 1 tensor, "
                                         r"first 'b_enc'"):
        read_tensors(path, kind="SAE")
    assert set(read_tensors(path, require_finite=False)[0]) == {"W_enc", "b_enc"}
    with pytest.raises(ValueError, match=r"sae\.safetensors' is not a SAE file \(no tensor 'W_dec'; it holds "
                                         r"'W_enc', 'b_enc'\)"):
        read_tensors(path, kind="SAE", names=("W_enc", "W_dec"))
    with pytest.raises(FileNotFoundError, match="SAE '.*missing.safetensors' not found"):
        read_tensors(tmp_path / "missing.safetensors", kind="SAE")


# ----- 2. a folder where a file is expected -------------------------------------------------------------

def test_basis_folder_says_folder(tmp_path):
    out = tmp_path / "concepts_out"
    basis().save(out / "concepts.safetensors")
    with pytest.raises(ValueError, match=r"concepts_out' is a folder; expected a \.safetensors file \(concept basis\); "
                                         r"it holds concepts\.safetensors"):
        ConceptBasis.load(out)


def test_inspect_folder(tiny_sd, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty is a folder; expected a checkpoint file .* "
                                         rf"folder holding {WEIGHTS_FILE}"):
        describe(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"empty is a folder; expected a checkpoint file"):
        read_checkpoint(tmp_path / "empty")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match=r"pipe is a diffusers pipeline folder; .*`featinv convert "):
        describe(tmp_path / "pipe")
    run = tmp_path / "run"  # a run or export folder: accepted, as load_featinv accepts it
    run.mkdir()
    save_file(tiny_sd, run / WEIGHTS_FILE)
    info = describe(run)
    assert info["path"] == str(run / WEIGHTS_FILE) and info["kind"].startswith("full FeatInv")


# ----- 3. inspect on a file that is not a checkpoint ----------------------------------------------------

def test_inspect_a_concept_basis(tmp_path, capsys):
    from featinv.cli import main

    path = basis().save(tmp_path / "concepts.safetensors")
    with pytest.raises(ValueError, match=r"concepts\.safetensors is a concept basis \(featinv concepts\), not a "
                                         r"model checkpoint"):
        describe(path)
    with pytest.raises(ValueError, match="is a concept basis"):
        load_featinv(path)  # every checkpoint reader says so
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("featinv inspect: error: ") and "is a concept basis" in err and "\n" not in err


def test_inspect_report_of_a_file_without_model_weights(tmp_path):
    from featinv.checkpoint.inspect import format_report

    save_file({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    report = format_report(describe(tmp_path / "other.safetensors"))
    assert "strict load not checked: the file holds no model weights (not a FeatInv" in report


# ----- 4. concept counts per method ---------------------------------------------------------------------

def test_methods_come_from_the_registry():
    from featinv.analysis.concept_methods import Method

    assert METHODS == tuple(CONCEPT_METHODS) == ("nmf", "dict", "pca", "kmeans", "topk", "batchtopk", "jumprelu")
    for name, entry in CONCEPT_METHODS.items():
        cls = entry.load()
        assert issubclass(cls, Method) and cls.name == name, name  # one class per method, named as registered
    assert resolve_method(None, True) == "nmf" and resolve_method(None, False) == "dict"
    assert resolve_method("pca", True) == "pca"
    with pytest.raises(ValueError, match="unknown concept method 'ica'"):
        resolve_method("ica", True)


@pytest.mark.parametrize(("method", "bound"), [("nmf", 8), ("pca", 8), ("dict", 270), ("kmeans", 270)])
def test_check_k_states_the_bound_of_each_method(method, bound):
    check_k(bound, method, 270, 8)
    with pytest.raises(ValueError, match=rf"^-k: k={bound + 1} exceeds .* method '{method}' .*1\.\.{bound} "):
        check_k(bound + 1, method, 270, 8)
    with pytest.raises(ValueError, match=r"^-k: k must be a positive number of concepts, got 0"):
        check_k(0, method, 270, 8)
    check_k(10**6, method, None, None)  # a stream: the bounds are checked on its first batch


@pytest.mark.parametrize("method", ["nmf", "pca", "kmeans", "dict"])
def test_fit_concepts_checks_k_before_scikit_learn(method):
    feats = torch.rand(30, 8, 3, 3)  # 270 vectors of 8 channels, non-negative
    k = 9 if method in ("nmf", "pca") else 271
    with pytest.raises(ValueError, match=rf"^-k: k={k} exceeds the (8 channels|270 feature-map locations)"):
        fit_concepts(feats, k, method)
    with pytest.raises(ValueError, match=r"^-k: k=9 exceeds the 8 channels .* method 'nmf'"):
        fit_concepts(feats, 9)  # None: nmf for non-negative maps
    with pytest.raises(ValueError, match=r"^-k: k=9 exceeds the 8 channels .* method 'pca'"):
        fit_concepts([feats[:10], feats[10:]], 9, "pca")  # a stream: checked on the first batch


def test_more_concepts_than_a_batch():
    """k above batch_size: the first batch holds k vectors, the later ones may be smaller."""
    basis = fit_concepts(torch.rand(30, 4, 3, 3), 40, "kmeans", passes=2, batch_size=32)
    assert basis.k == 40 and basis.atoms.isfinite().all()


# ----- 5. a backbone whose weights cannot be had; a bad --init file ----------------------------------------

RESNET18 = BackboneConfig(name="resnet18.a1_in1k", pretrained=True, image_size=64)


@pytest.fixture()
def empty_hub_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return hf_constants


def test_offline_backbone_is_a_one_line_value_error(empty_hub_cache, monkeypatch):
    from featinv.nets.backbone import build_backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(empty_hub_cache, "HF_HUB_OFFLINE", True)  # huggingface_hub raises LocalEntryNotFoundError
    with pytest.raises(ValueError, match=r"backbone 'resnet18.a1_in1k': its pretrained weights .* not in the "
                                         r"local cache .*HF_HUB_OFFLINE is set.*--backbone-checkpoint FILE") as err:
        build_backbone(RESNET18)
    assert "\n" not in str(err.value) and "HF_HOME" in str(err.value)


def test_unreachable_hub_is_a_one_line_value_error(empty_hub_cache, monkeypatch):
    from featinv.nets.backbone import build_backbone

    monkeypatch.setattr(empty_hub_cache, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(empty_hub_cache, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ValueError, match=r"resnet18.a1_in1k.*cannot be downloaded \(the hub http://127.0.0.1:9 is "
                                         r"unreachable: .*--backbone-checkpoint FILE") as err:
        build_backbone(RESNET18)
    assert "\n" not in str(err.value)


def test_other_backbone_errors_are_not_taken_for_offline(monkeypatch):
    import timm

    from featinv.nets import backbone

    monkeypatch.setattr(backbone, "_cached_weights_if_offline", lambda cfg, pcfg: None)

    def broken(*args, **kwargs):
        raise TypeError("a bug")
    monkeypatch.setattr(timm, "create_model", broken)
    with pytest.raises(TypeError, match="a bug"):
        backbone.build_backbone(RESNET18)


@pytest.mark.parametrize("content", [b"not a checkpoint\n" * 4, "truncated"])
def test_bad_init_file_is_a_one_line_value_error(tmp_path, content):
    from featinv.training.loop import check_init_channels

    path = tmp_path / "init.safetensors"
    if content == "truncated":
        save_file({"a": torch.randn(64, 64)}, path)
        content = path.read_bytes()[:1000]
    path.write_bytes(content)
    check_init_channels(path, 64, "resnet18")  # unreadable: left to the loader, which names the file
    with pytest.raises(ValueError, match=r"init\.safetensors: not a readable safetensors file") as err:
        load_featinv(path)
    assert "\n" not in str(err.value)

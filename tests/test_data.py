"""Image folders, transforms and the loader that skips unreadable files."""
import shutil
import warnings

import pytest
import torch
from helpers import sample_photos_folder
from torchvision.transforms.v2 import functional as TF

from featinv.data import UNLABELED, ImageDataset, collate_skip, find_images, make_loader

S, IMG = 48, 32  # backbone crop and diffusion image size, small for speed


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory):
    """Five bundled photos in three class folders, plus a corrupt .JPEG and a non-image file."""
    root = sample_photos_folder(tmp_path_factory.mktemp("imagenet"), size=64)
    gen = torch.Generator().manual_seed(0)
    (root / "animal" / "broken.JPEG").write_bytes(torch.randint(0, 256, (512,), generator=gen,
                                                                dtype=torch.uint8).numpy().tobytes())
    (root / "thing" / "notes.txt").write_text("not an image")
    return root


def test_find_images_imagenet_layout(photo_root):
    items, classes = find_images(photo_root)
    assert classes == ["animal", "person", "thing"]
    names = [(p.rsplit("/", 1)[1], c) for p, c in items]
    assert names == [("broken.JPEG", 0), ("chelsea.JPEG", 0), ("astronaut.JPEG", 1),
                     ("camera.JPEG", 1), ("coffee.JPEG", 2), ("rocket.JPEG", 2)]


def test_loader_skips_corrupt_image(photo_root):
    ds = ImageDataset(photo_root, backbone_size=S, image_size=IMG, train=True)
    with pytest.warns(UserWarning, match="broken.JPEG"):
        batches = list(make_loader(ds, batch_size=4, shuffle=True, seed=0))
    assert sum(b["skipped"] for b in batches) == 1
    indices = sorted(i for b in batches for i in b["index"].tolist())
    assert indices == [1, 2, 3, 4, 5]  # every readable image, once
    for b in batches:
        n = len(b["index"])
        assert b["feat_input"].shape == (n, 3, S, S) and b["feat_input"].dtype == torch.float32
        assert b["image"].shape == (n, 3, IMG, IMG) and b["image"].dtype == torch.float32
        assert 0 <= b["feat_input"].min() and b["feat_input"].max() <= 1
        assert -1 <= b["image"].min() and b["image"].max() <= 1
        assert b["label"].dtype == torch.int64
        assert b["label"].tolist() == [ds.items[i][1] for i in b["index"].tolist()]


def test_loader_with_workers(photo_root):
    ds = ImageDataset(photo_root, backbone_size=S, image_size=IMG, train=True)
    loader = make_loader(ds, batch_size=2, num_workers=2, shuffle=True, seed=0, drop_last=False)
    assert loader.persistent_workers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    assert sum(b["skipped"] for b in batches) == 1
    assert sorted(i for b in batches for i in b["index"].tolist()) == [1, 2, 3, 4, 5]


def test_all_bad_batch_is_empty():
    batch = collate_skip([None, None])
    assert batch["skipped"] == 2 and batch["index"].numel() == 0 and batch["label"].numel() == 0


def test_eval_transform_deterministic_and_one_crop(photo_root):
    ds = ImageDataset(photo_root, backbone_size=S, image_size=IMG, train=False)
    a, b = ds[4], ds[4]  # rocket, 64x96: Resize(48) -> 48x72 -> CenterCrop(48)
    torch.testing.assert_close(a["feat_input"], b["feat_input"])
    assert a["label"].item() == 2 and a["index"] == 4
    # The diffusion target is the same crop, resized and mapped to [-1, 1].
    expected = TF.resize(a["feat_input"], [IMG, IMG], antialias=True) * 2 - 1
    torch.testing.assert_close(a["image"], expected, atol=1e-6, rtol=0)
    assert ds[3]["feat_input"].shape == (3, S, S)  # grayscale camera.JPEG becomes RGB


def test_train_transform_varies_and_is_seedable(photo_root):
    ds = ImageDataset(photo_root, backbone_size=S, image_size=IMG, train=True)

    def epoch():
        return torch.stack([ds[i]["feat_input"] for i in range(1, len(ds))])

    torch.manual_seed(0)
    first, second = epoch(), epoch()
    assert not torch.allclose(first, second)  # new crops / flips every epoch
    torch.manual_seed(0)
    torch.testing.assert_close(epoch(), first)  # reproducible from the seed


def test_plain_folder(photo_root, tmp_path):
    for name in ("chelsea", "coffee"):
        shutil.copy(next(photo_root.rglob(f"{name}.JPEG")), tmp_path / f"{name}.jpeg")
    items, classes = find_images(tmp_path)
    assert classes == [] and [c for _, c in items] == [UNLABELED, UNLABELED]
    ds = ImageDataset(tmp_path, backbone_size=S, image_size=IMG, train=False)
    assert ds[0]["label"].item() == UNLABELED
    ds_items = ImageDataset(items, backbone_size=S, image_size=IMG, train=False)
    assert len(ds_items) == 2


def test_missing_or_empty_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        find_images(tmp_path / "does_not_exist")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        find_images(tmp_path)

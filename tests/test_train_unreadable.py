"""`featinv train` on a folder whose images cannot be read (issue 26): one error line, exit 2, nothing exported."""
from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from featinv.checkpoint.build_control import build_control
from featinv.checkpoint.config_file import merge
from featinv.cli import main
from featinv.config import PRESETS, WEIGHTS_FILE
from featinv.data import ImageDataset, UnreadableImagesError
from featinv.training.module import _Loader

ADAPTER_WIDTH = 64  # a narrow adapter keeps each run at a few seconds on a CPU


@pytest.fixture(scope="module")
def init_ckpt(tiny_minisd, tmp_path_factory):
    out = tmp_path_factory.mktemp("init") / "init.safetensors"
    build_control(tiny_minisd, out, cfg=merge(PRESETS["tiny"].model, {"adapter": {"width": ADAPTER_WIDTH}}),
                  hint_channels=512)  # the tiny backbone, resnet18, gives 512 channels
    return out


def png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((72, 72), 40 + seed).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def image_folder(root, readable: int, unreadable: int):
    """``<root>/things/``: ``readable`` PNGs, then unreadable ``.png`` files, alternately text and a cut-short PNG."""
    folder = root / "things"
    folder.mkdir(parents=True)
    for i in range(readable):
        (folder / f"good{i}.png").write_bytes(png_bytes(i))
    for i in range(unreadable):
        (folder / f"bad{i}.png").write_bytes(b"not an image" if i % 2 == 0 else png_bytes(i)[:200])
    return root


def train(init_ckpt, data, run, capsys, batch_size: int = 2, max_steps: int = 2):
    """``featinv train`` in this process on the CPU -> (exit status, the stderr lines starting "featinv ")."""
    capsys.readouterr()
    status = main(["train", "--config", "tiny", "--init", str(init_ckpt), "--data", str(data), "--run-dir", str(run),
                   "--accelerator", "cpu", f"model.adapter.width={ADAPTER_WIDTH}", f"data.batch_size={batch_size}",
                   f"train.max_steps={max_steps}", "data.num_workers=0", "train.log_images_every=0"])
    err = capsys.readouterr().err
    return status, [line for line in err.splitlines() if line.startswith("featinv ")], err


def refused(result) -> str:
    """The one error line of a refused run, which trained no step."""
    status, lines, err = result
    assert status == 2 and len(lines) == 1 and lines[0].startswith("featinv train: error: "), err[-3000:]
    assert "step 1/" not in err and "Traceback" not in err
    return lines[0]


def test_a_folder_of_unreadable_files_is_an_error_and_exports_nothing(init_ckpt, tmp_path, capsys):
    data = image_folder(tmp_path / "data", readable=0, unreadable=2)
    line = refused(train(init_ckpt, data, tmp_path / "run", capsys))
    assert f"--data {data}: 0 images (skipping 2 unreadable) < data.batch_size 2, so no training batch" in line
    assert line.endswith("fix or remove them: things/bad0.png, things/bad1.png"), line
    assert not (tmp_path / "run" / WEIGHTS_FILE).exists()


def test_the_error_names_a_few_unreadable_files_then_how_many_more(init_ckpt, tmp_path, capsys):
    data = image_folder(tmp_path / "data", readable=0, unreadable=5)
    line = refused(train(init_ckpt, data, tmp_path / "run", capsys, batch_size=5))
    assert line.endswith("fix or remove them: things/bad0.png, things/bad1.png, things/bad2.png and 2 more"), line
    assert not (tmp_path / "run" / WEIGHTS_FILE).exists()


def test_fewer_readable_images_than_a_batch_is_an_error(init_ckpt, tmp_path, capsys):
    data = image_folder(tmp_path / "data", readable=1, unreadable=1)  # one batch, one image in it
    line = refused(train(init_ckpt, data, tmp_path / "run", capsys))
    assert f"--data {data}: 1 image (skipping 1 unreadable) < data.batch_size 2" in line
    assert line.endswith("fix or remove them: things/bad0.png"), line
    assert not (tmp_path / "run" / WEIGHTS_FILE).exists()


def test_a_batch_without_a_readable_image_is_an_error_while_enough_files_are_left(tmp_path):
    data = image_folder(tmp_path / "data", readable=3, unreadable=2)
    loader = _Loader(ImageDataset(data, 64), batch_size=2, num_workers=0, seed=0, root=str(data))
    loader.trainer = SimpleNamespace(world_size=1)
    assert [p.rsplit("/", 1)[1] for p, _ in loader.dataset.items[:2]] == ["bad0.png", "bad1.png"]
    loader.count_images({"index": torch.tensor([2]), "unreadable": [0]})  # 4 files left: goes on
    with pytest.raises(UnreadableImagesError) as e:
        loader.count_images({"index": torch.empty(0, dtype=torch.int64), "unreadable": [0, 1]})
    assert str(e.value) == (f"--data {data}: no readable image in a training batch (skipping 2 unreadable); "
                            "fix or remove them: things/bad0.png, things/bad1.png")


def test_enough_readable_images_beside_an_unreadable_one_train(init_ckpt, tmp_path, capsys):
    data = image_folder(tmp_path / "data", readable=3, unreadable=1)  # two batches an epoch, three images
    status, lines, err = train(init_ckpt, data, tmp_path / "run", capsys)
    assert status == 0 and not lines, err[-3000:]
    assert "skipping unreadable image" in err and (tmp_path / "run" / WEIGHTS_FILE).exists()

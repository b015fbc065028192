"""Logs a person can read (issue 26): with stderr in a file, progress is whole lines there (no carriage return),
stdout holds the results only, and Lightning's banners and lines a featinv user cannot act on are gone."""
from __future__ import annotations

import io
import logging
import signal
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch

from featinv.runtime import LineBar, progress_bar, quiet_lightning

LIGHTNING_NOISE = ("GPU available", "TPU available", "Trainer.fit` stopped", "Detected KeyboardInterrupt", "Tip:")


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """The progress clock, moved by hand: ``clock[0] = seconds``."""
    now = [0.0]
    monkeypatch.setattr("featinv.runtime.monotonic", lambda: now[0])
    return now


@pytest.fixture
def lightning_log():
    """What reaches Lightning's logger, wherever its own handler writes (its stream is bound at import)."""
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    logger = logging.getLogger("pytorch_lightning")
    logger.addHandler(handler)
    yield text
    logger.removeHandler(handler)


def test_runtime_imports_without_torch():
    code = "import sys, featinv.runtime; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_a_log_gets_the_first_and_last_update_and_one_line_every_30_s(clock, capsys):
    bar = progress_bar(range(10), desc="2/4 autoencoder", unit="step")
    assert isinstance(bar, LineBar)  # stderr is not a terminal
    for i in bar:
        clock[0] += 10.0
        bar.set_postfix(mse=f"{i / 10:.1f}")
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "".join(f"2/4 autoencoder: {n}/10 step (0.10 step/s)  mse={(n - 1) / 10:.1f}\n" for n in (1, 4, 7, 10))


def test_a_terminal_gets_tqdms_bar(monkeypatch):
    from tqdm import tqdm

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with progress_bar(total=3, desc="evaluate", unit="batch") as bar:
        assert isinstance(bar, tqdm)


def test_nothing_is_printed_after_an_interrupt(clock, capsys):
    with pytest.raises(KeyboardInterrupt), progress_bar(total=5, desc="reconstruct", unit="img") as bar:
        clock[0] = 1.0
        bar.update(2)
        clock[0] = 60.0
        raise KeyboardInterrupt
    bar.update(3)  # the last update, 59 s later: a batch that ended during the shutdown
    assert capsys.readouterr().err == "reconstruct: 2/5 img (2.00 img/s)\n"


class _Tiny(pl.LightningModule):
    """One linear layer; ``interrupt``: the first step raises KeyboardInterrupt (Ctrl-C)."""

    def __init__(self, interrupt: bool = False):
        super().__init__()
        self.layer, self.interrupt = torch.nn.Linear(2, 1), interrupt

    def training_step(self, batch, batch_idx):
        if self.interrupt:
            raise KeyboardInterrupt
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=4)


def _fit(module: _Tiny) -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)


def test_lightning_says_only_what_a_user_can_act_on(capfd, lightning_log):
    from pytorch_lightning.utilities.rank_zero import rank_zero_info

    quiet_lightning()
    _fit(_Tiny())
    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning ends an interrupted fit with sys.exit(1)
            _fit(_Tiny(interrupt=True))
    finally:
        signal.signal(signal.SIGINT, before)  # Lightning leaves SIGINT ignored
    rank_zero_info("a line a user can act on")  # the filter drops what it names, nothing else
    out, err = capfd.readouterr()
    text = out + err + lightning_log.getvalue()
    assert [noise for noise in LIGHTNING_NOISE if noise in text] == [], text
    assert "a line a user can act on" in lightning_log.getvalue()


def _results_only(out: str, err: str) -> None:
    assert out == "", out
    assert "\r" not in err, err[-2000:]
    assert [noise for noise in LIGHTNING_NOISE if noise in err] == [], err


def test_a_demo_run_from_scratch_logs_whole_lines_and_prints_no_result(tmp_path, capfd, lightning_log):
    """Every stage trains for real (tiny settings): the tqdm-drawn stages 1-3 and the Lightning stage 4."""
    from featinv.demo.stages import DemoSettings, demo_parts

    tiny = DemoSettings(classifier_epochs=1, vae_steps=2, vae_batch=8, unet_steps=2, unet_batch=4, control_steps=2,
                        control_batch=4, samples=1, sample_steps=1)
    threads = torch.get_num_threads()
    try:
        demo_parts(tmp_path, settings=tiny)
    finally:
        torch.set_num_threads(threads)
    out, err = capfd.readouterr()
    _results_only(out, err + lightning_log.getvalue())
    for line in ("1/4 classifier: 1/1 epoch (", "2/4 autoencoder: 1/2 step (", "2/4 autoencoder: 2/2 step (",
                 "3/4 diffusion UNet: 2/2 step (", "step 2/2  train/loss "):
        assert line in err, (line, err)


def test_a_short_reconstruct_logs_whole_lines_and_prints_no_result(tiny_job, tmp_path, capfd, lightning_log):
    from featinv.config import PairSource, ReconstructJob, SampleConfig
    from featinv.jobs.reconstruct import reconstruct_folder

    job = ReconstructJob(PairSource(), str(tiny_job["root"]), str(tmp_path / "out"), per_class=1,
                         sample=SampleConfig(steps=1, num_samples=1), batch_size=2, accelerator="cpu", devices=1)
    manifest = reconstruct_folder(job, model=tiny_job["model"], extractor=tiny_job["backbone"])
    out, err = capfd.readouterr()
    _results_only(out, err + lightning_log.getvalue())
    assert f"reconstruct (rank 0 of 1): {manifest['items']}/{manifest['items']} img (" in err, err

"""Run-time policy: the one thread rule every command applies."""
from __future__ import annotations

import argparse

import torch

from featinv.runtime import default_threads, usable_cores


def test_threads_follow_omp_num_threads_else_one_less_than_the_usable_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == max(1, usable_cores() - 1)
    monkeypatch.setattr("featinv.runtime.usable_cores", lambda: 1)
    assert default_threads() == 1


def test_every_command_runs_with_the_rule_and_restores_the_callers_threads(monkeypatch):
    from featinv.commands._common import command

    seen = []

    @command("evaluate", parse=lambda argv: argparse.Namespace())
    def job(args):
        seen.append(torch.get_num_threads())

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert job([]) == 0 and seen == [2]
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)

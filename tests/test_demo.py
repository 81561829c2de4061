"""`bitdelta demo` at a tenth of its size: it shows progress in every phase when stderr is not a
terminal, a second run recomputes nothing, and the merged checkpoint it shows is the distilled
delta's."""

from __future__ import annotations

import re

import pytest

from bitdelta import demo, tiny
from bitdelta.distill import DistillConfig


@pytest.fixture
def small_demo(monkeypatch):
    monkeypatch.setattr(demo, "DEMO_SPEC", tiny.TinySpec(family="llama", hidden=64, layers=2, heads=4, intermediate=128, vocab=512, context=64))
    for name, value in (("BASE_STEPS", 12), ("FINETUNE_STEPS", 8), ("SECOND_FINETUNE_STEPS", 4), ("SEQ_LEN", 32), ("TEXT_CHARS", 120_000)):
        monkeypatch.setattr(demo, name, value)
    monkeypatch.setattr(demo, "DEMO_DISTILL", DistillConfig(samples=8, seq_len=32, steps=4, lr=1e-4, heldout=4, batch_size=4))
    monkeypatch.setattr("bitdelta.progress.LINE_SECONDS", 0.0)  # a line for every step: the test sees each phase


def test_a_second_run_recomputes_nothing_and_shows_the_distilled_merge(small_demo, tmp_path, capsys, monkeypatch):
    first = demo.run_demo(tmp_path)
    progress = capsys.readouterr().err
    for phase in ("training the base", "fine-tuning", "fine-tuning (upper case)", "compressing", "distilling scales", "merging"):
        assert re.search(rf"^{re.escape(phase)}: ", progress, re.M), phase
    work = []
    for name in ("compress", "merge", "serve_two_in_one_batch"):
        real = getattr(demo, name)
        monkeypatch.setattr(demo, name, lambda *a, real=real, name=name, **k: (work.append(name), real(*a, **k))[1])
    monkeypatch.setattr(tiny, "train", lambda *a, **k: work.append("train"))
    second = demo.run_demo(tmp_path)
    assert work == ["serve_two_in_one_batch"]  # only the engine's check runs again; every model and delta is reused
    assert second.rows == first.rows and all(row.identical for row in second.batch)
    losses = dict((label, (prose, code)) for label, prose, code in second.rows)
    assert losses["merged checkpoint of the distilled delta"] == pytest.approx(losses["BitDelta (distilled, matrix scales)"], abs=1e-4)

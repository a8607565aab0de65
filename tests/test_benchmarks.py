"""Each benchmark script runs end to end with ``--quick`` (a tiny model, one round, a few steps) and prints its
table: a smoke test of the scripts, in-process so the imports are shared. No timing is asserted here; the measured
numbers are in BENCHMARKS.md. Left out to keep CI time down: ``bench_callbacks.py --quick`` (~25 s: four fits with
W&B; the suite under the Trainer is tested in tests/test_suite.py and tests/test_no_host_sync.py) and
``bench_data.py --quick`` (``cs336 prepare`` subprocesses; ``prepare`` is tested in tests/test_data.py)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(sys, "argv", [str(BENCH / script), *args])
    monkeypatch.syspath_prepend(str(BENCH))
    runpy.run_path(str(BENCH / script), run_name="__main__")
    return capsys.readouterr().out


def test_bench_generate_quick(capsys, monkeypatch) -> None:
    out = _run("bench_generate.py", "--quick", capsys=capsys, monkeypatch=monkeypatch)
    rows = [line for line in out.splitlines() if line.startswith("| ") and "x |" in line]
    assert len(rows) == 4  # 2 lengths x 2 batch sizes
    assert "| 31 (full) | 2 |" in out and "31 / 496" in out  # positions: cache 31, re-run 1 + 2 + ... + 31


def test_bench_floor_quick(capsys, monkeypatch) -> None:
    out = _run("bench_floor.py", "--quick", capsys=capsys, monkeypatch=monkeypatch)
    assert "| plain loop |" in out and "| Trainer |" in out
    assert "aten ops per training step" in out

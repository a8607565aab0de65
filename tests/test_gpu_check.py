"""The GPU check (``benchmarks/gpu_check.py``) is ready to run: it imports, skips cleanly with one line and exit 0 on a
machine without CUDA, rejects a bad config name with one line and exit 2, and its table arithmetic (MFU, overhead,
verdicts) is right on made-up measurements. The GPU part itself runs only on a GPU (``bash benchmarks/gpu_check.sh``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on a machine without CUDA")
def test_skips_with_one_line_and_exit_0_without_cuda() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: skipped: no CUDA GPU"), proc.stdout
    assert "Traceback" not in proc.stderr


def test_unknown_config_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main(["--configs", "cs336-17m,gpt3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config(s) ['gpt3']" in err[0] and "cs336-17m" in err[0]


def test_configs_are_the_cs336_17m_and_a_124m_gpt2_small() -> None:
    from lightning_cs336.model import ModelConfig, TransformerLM

    spec = gpu_check.CONFIGS["cs336-17m"]
    small = ModelConfig.from_config_file(ROOT / "configs" / spec["model_file"], **spec["overrides"])
    assert (small.d_model, small.num_layers, small.context_length, small.vocab_size) == (512, 4, 256, 10_000)
    big = ModelConfig(**gpu_check.CONFIGS["gpt2-small-124m"]["model"])
    with torch.device("meta"):  # sizes only: no memory for 160M parameters
        n = TransformerLM(big).num_parameters(non_embedding=True)
    assert 120e6 < n < 128e6 and big.context_length == 1024


def test_table_arithmetic_on_made_up_measurements() -> None:
    M = gpu_check.Measurement
    fast = M("cs336-17m", 17.6, 1e8, 65536, without=[1.0e6, 1.1e6], with_suite=[0.995e6, 1.0945e6], syncs=0)
    fast.quiet_steps = 114
    slow = M("gpt2-small-124m", 123.6, 1e9, 16384, without=[3e5, 3e5], with_suite=[2.9e5, 2.85e5], syncs=3)
    slow.syncs_without = 0
    table = gpu_check.build_table([fast, slow], 1e15, "NVIDIA H200", smoke="passed: 1 passed (30 s)")
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    # 17m: median without 1.05e6 tokens/s x 1e8 FLOP / 1e15 = 10.5% MFU; overhead 1 - 0.995 = 0.50%.
    assert "1,050,000 | 10.5%" in rows["cs336-17m"] and "+0.50%" in rows["cs336-17m"]
    assert "0 in 114 steps" in rows["cs336-17m"]
    # 124m: 3e5 x 1e9 / 1e15 = 30% MFU (missed), overhead median(2.9/3, 2.85/3) -> 1 - 0.9583 = 4.17% (missed).
    assert "| 30.0% |" in rows["gpt2-small-124m"] and "+4.17%" in rows["gpt2-small-124m"]
    assert "(without the suite: 0)" in rows["gpt2-small-124m"]
    assert "GPU smoke" in table and "passed: 1 passed" in table
    verdicts = table.split("\n\n")[-1]
    assert "cs336-17m: suite overhead 0.50% (ok" in verdicts
    assert "gpt2-small-124m: suite overhead 4.17% (MISSED" in verdicts
    assert "gpt2-small-124m: 3 syncs on non-logging steps (MISSED" in verdicts
    assert "gpt2-small-124m: MFU 30.0% (MISSED >= 40%)" in verdicts
    # Without a known peak FLOP/s there is no MFU, and the table says so instead of inventing one.
    assert gpu_check.mfu(1e6, 1e8, None) is None
    assert "n/a" in gpu_check.build_table([fast], None, "Unknown GPU")

"""Shared test fixtures.

Every test runs with W&B isolated in its own temporary directory, offline, with no API key: wandb reads its
environment once per process, so the fixture also tears wandb's service down around each test that used it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_WANDB_QUIET = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_CONSOLE": "off",
    "WANDB_DISABLE_GIT": "true",
    "WANDB_DISABLE_CODE": "true",
    "WANDB_X_DISABLE_STATS": "true",
    "WANDB_X_DISABLE_META": "true",
    "WANDB_X_SAVE_REQUIREMENTS": "false",
    "WANDB_ERROR_REPORTING": "false",
}


def _teardown_wandb() -> None:
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
        wandb.teardown()


@pytest.fixture(autouse=True)
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every W&B directory into this test's tmp dir; offline, quiet, no key. Returns the WANDB_DIR."""
    root = tmp_path / "wandb_root"
    for var in ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    for key, value in _WANDB_QUIET.items():
        monkeypatch.setenv(key, value)
    for var, sub in (
        ("WANDB_DIR", "dir"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_CONFIG_DIR", "config"),
    ):
        path = root / sub
        path.mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(var, str(path))
    _teardown_wandb()
    yield root / "dir"
    _teardown_wandb()


@pytest.fixture(autouse=True)
def _torch_threads() -> None:
    """Keep torch single-threaded-ish and deterministic across tests on the 2-core CI machine."""
    import torch

    torch.manual_seed(0)
    os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small prepared corpus (byte-level tokenizer, ~200 kB of the stdlib's sources), made once per session."""
    from lightning_cs336.data import prepare

    out = tmp_path_factory.mktemp("tiny_data") / "bytes"
    prepare(["stdlib"], out, tokenizer="byte", max_bytes=200_000, val_fraction=0.1, show_progress=False)
    return out

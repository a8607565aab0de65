"""The README's callback table names exactly the keys each callback's ``METRIC_KEYS`` declares."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

import lightning_cs336.callbacks as suite

README = Path(__file__).resolve().parents[1] / "README.md"
CALLBACKS = [getattr(suite, name) for name in suite.__all__ if hasattr(getattr(suite, name), "METRIC_KEYS")]


def _expand(token: str) -> list[str]:
    """``a/{x,y}_z`` -> ``a/x_z``, ``a/y_z`` (every brace group, combined)."""
    parts = re.split(r"\{([^}]*)\}", token)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def _row_keys(cls: type) -> set[str]:
    row = next(line for line in README.read_text().splitlines() if line.startswith(f"| `{cls.__name__}` |"))
    logs = row.split(" | ")[1]
    return {key for token in re.findall(r"`([^`]+)`", logs) if "/" in token for key in _expand(token)}


@pytest.mark.parametrize("cls", CALLBACKS, ids=lambda c: c.__name__)
def test_readme_row_matches_metric_keys(cls: type) -> None:
    keys = _row_keys(cls)
    extra = {cls.PER_LAYER_KEY + "<group>"} if hasattr(cls, "PER_LAYER_KEY") else set()
    assert keys - extra == set(cls.METRIC_KEYS)


def test_every_exported_callback_has_a_row() -> None:
    assert len(CALLBACKS) == 10

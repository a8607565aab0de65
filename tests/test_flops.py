"""``LanguageModel.flops_per_token`` (what SpeedMonitor's MFU divides by) against ``torch.utils.flop_counter``.

Conventions, and why the comparison is exact rather than approximate:

- ``FlopCounterMode`` counts matmuls only (``mm``, ``bmm``, ``addmm``, attention kernels), 2 FLOPs per multiply-add,
  forward and backward: the same convention as the model's count, which leaves out softmax, norms, SwiGLU gating and
  RoPE (elementwise). So the parameter term must match *exactly*: ``6 N`` per token, ``N`` = matmul parameters.
- Attention: the model counts PaLM's ``12 L T d`` *halved* (``6 L T d``), since causal attention needs only the lower
  triangle and the fused kernels skip the upper one. The counter sees the fused CPU kernel as one uncounted op, so the
  test forces the MATH backend, which runs the full ``T x T`` products as ``bmm``: the counter then reports the
  unhalved ``12 L T d``. Hence: counted = model's count + ``6 L T d``, exactly (tolerance: float rounding only).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lightning_cs336.model import ModelConfig
from lightning_cs336.module import LanguageModel

ROOT = Path(__file__).resolve().parents[1]


def _model(**overrides) -> tuple[LanguageModel, ModelConfig]:
    cfg = ModelConfig.from_config_file(ROOT / "configs/debug.yaml", vocab_size=257, **overrides)
    return LanguageModel(**{name: getattr(cfg, name) for name in cfg.__dataclass_fields__}), cfg


def _counted(model: LanguageModel, batch: int, seq_len: int, math_attention: bool) -> tuple[float, dict[str, int]]:
    x = torch.randint(0, 257, (batch, seq_len))
    backend = sdpa_kernel(SDPBackend.MATH) if math_attention else torch.enable_grad()
    with backend, FlopCounterMode(display=False) as counter:
        logits = model.model(x)
        F.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops() / (batch * seq_len), by_op


@pytest.mark.parametrize("overrides", [{}, {"num_layers": 3, "d_ff": 96}], ids=["debug", "debug-3-layers"])
def test_flops_per_token_matches_the_flop_counter(overrides: dict) -> None:
    model, cfg = _model(**overrides)
    L, T, d = cfg.num_layers, cfg.context_length, cfg.d_model
    n_matmul = L * (4 * d * d + 3 * d * cfg.d_ff) + cfg.vocab_size * d
    # The fused kernel: only the linear layers are counted, and they are exactly 6N.
    linear_only, ops = _counted(model, batch=2, seq_len=T, math_attention=False)
    assert set(ops) == {"aten.mm"}
    assert linear_only == 6 * n_matmul
    # The math kernel adds the full (unmasked) attention products.
    model.zero_grad()
    full, ops = _counted(model, batch=2, seq_len=T, math_attention=True)
    assert set(ops) == {"aten.mm", "aten.bmm"}
    assert full == pytest.approx(model.flops_per_token + 6 * L * T * d, rel=1e-12)
    assert model.flops_per_token == pytest.approx(6 * n_matmul + 6 * L * T * d, rel=1e-12)


def test_shorter_sequences() -> None:
    """``TransformerLM.flops_per_token(seq_len)``: the attention term follows the sequence length trained at."""
    model, cfg = _model()
    T = cfg.context_length // 2
    full, _ = _counted(model, batch=3, seq_len=T, math_attention=True)
    assert full == pytest.approx(model.model.flops_per_token(T) + 6 * cfg.num_layers * T * cfg.d_model, rel=1e-12)

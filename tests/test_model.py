"""Tests for lightning_cs336.model: every piece against an independent naive implementation written here
(explicit loops / einsum, float64), plus state-dict compatibility, init, generation and checkpoints."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from lightning_cs336.cs336_format import load_cs336_checkpoint, save_cs336_checkpoint
from lightning_cs336.model import (
    KVCache,
    Linear,
    ModelConfig,
    MultiHeadSelfAttention,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    TransformerBlock,
    TransformerLM,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEBUG = dict(vocab_size=257, context_length=32, d_model=32, num_layers=2, num_heads=2, d_ff=64)
TOL = dict(atol=2e-5, rtol=1e-4)  # float32 model vs float64 reference


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: intra-op threads only add wake-up latency (10x slower on a busy 2-core box).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(**overrides: int | float) -> TransformerLM:
    return TransformerLM(ModelConfig(**{**DEBUG, **overrides}))


# ----------------------------------------------------------------------------------------------------------------------
# Naive reference implementations (float64, written independently of the model code)


def ref_rmsnorm(x: torch.Tensor, g: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * g.double()


def ref_swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    x = x.double()
    a = torch.einsum("...d,fd->...f", x, w1.double())
    b = torch.einsum("...d,fd->...f", x, w3.double())
    return torch.einsum("...f,df->...d", a / (1 + torch.exp(-a)) * b, w2.double())


def ref_rope(x: torch.Tensor, theta: float, start_pos: int = 0) -> torch.Tensor:
    """x: (..., T, d). Rotate pair (2j, 2j+1) at position p by p * theta^(-2j/d), one pair at a time."""
    x = x.double()
    out = x.clone()
    T, d = x.shape[-2], x.shape[-1]
    for t in range(T):
        p = start_pos + t
        for j in range(d // 2):
            angle = p * theta ** (-2 * j / d)
            c, s = math.cos(angle), math.sin(angle)
            x0, x1 = x[..., t, 2 * j], x[..., t, 2 * j + 1]
            out[..., t, 2 * j] = c * x0 - s * x1
            out[..., t, 2 * j + 1] = s * x0 + c * x1
    return out


def ref_attention(x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str, num_heads: int, theta: float):
    """softmax(Q K^T / sqrt(d) + causal mask) V, head by head; heads are column blocks of the projections."""
    x = x.double()
    B, T, D = x.shape
    dh = D // num_heads
    q = torch.einsum("btd,ed->bte", x, sd[prefix + "q_proj.weight"].double())
    k = torch.einsum("btd,ed->bte", x, sd[prefix + "k_proj.weight"].double())
    v = torch.einsum("btd,ed->bte", x, sd[prefix + "v_proj.weight"].double())
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    heads = []
    for h in range(num_heads):
        cols = slice(h * dh, (h + 1) * dh)
        qh, kh, vh = ref_rope(q[..., cols], theta), ref_rope(k[..., cols], theta), v[..., cols]
        scores = torch.einsum("bqd,bkd->bqk", qh, kh) / math.sqrt(dh) + mask
        heads.append(torch.einsum("bqk,bkd->bqd", torch.softmax(scores, dim=-1), vh))
    y = torch.cat(heads, dim=-1)
    return torch.einsum("btd,ed->bte", y, sd[prefix + "output_proj.weight"].double())


def ref_block(x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str, num_heads: int, theta: float):
    x = x.double()
    x = x + ref_attention(ref_rmsnorm(x, sd[prefix + "ln1.weight"]), sd, prefix + "attn.", num_heads, theta)
    w = [sd[f"{prefix}ffn.w{i}.weight"] for i in (1, 2, 3)]
    return x + ref_swiglu(ref_rmsnorm(x, sd[prefix + "ln2.weight"]), *w)


def ref_lm(idx: torch.Tensor, sd: dict[str, torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    x = sd["token_embeddings.weight"].double()[idx]
    for i in range(cfg.num_layers):
        x = ref_block(x, sd, f"layers.{i}.", cfg.num_heads, cfg.rope_theta)
    return torch.einsum("btd,vd->btv", ref_rmsnorm(x, sd["ln_final.weight"]), sd["lm_head.weight"].double())


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    V, D, F = cfg.vocab_size, cfg.d_model, cfg.d_ff
    shapes = {"token_embeddings.weight": (V, D)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes[p + "ln1.weight"] = (D,)
        for name in ("q_proj", "k_proj", "v_proj", "output_proj"):
            shapes[f"{p}attn.{name}.weight"] = (D, D)
        shapes[p + "ln2.weight"] = (D,)
        shapes[p + "ffn.w1.weight"] = (F, D)
        shapes[p + "ffn.w2.weight"] = (D, F)
        shapes[p + "ffn.w3.weight"] = (F, D)
    shapes["ln_final.weight"] = (D,)
    shapes["lm_head.weight"] = (V, D)
    return shapes


def random_state_dict(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A CS336-style state dict built by hand from the documented names/shapes; gains away from 1 on purpose."""
    sd = {}
    for name, shape in expected_shapes(cfg).items():
        sd[name] = 1 + 0.1 * torch.randn(shape) if len(shape) == 1 else torch.randn(shape) / math.sqrt(shape[-1])
    return sd


# ----------------------------------------------------------------------------------------------------------------------
# Pieces against the naive references


def test_rmsnorm_matches_reference_and_keeps_dtype() -> None:
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(3, 5, 16) * 4
    torch.testing.assert_close(norm(x).double(), ref_rmsnorm(x, norm.weight.detach()), **TOL)
    y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref_rmsnorm(x.bfloat16(), norm.weight.detach()), atol=0.05, rtol=0.02)


def test_swiglu_matches_reference() -> None:
    ffn = SwiGLU(16, 40)
    assert ffn.w1.weight.shape == (40, 16) and ffn.w2.weight.shape == (16, 40) and ffn.w3.weight.shape == (40, 16)
    x = torch.randn(2, 7, 16)
    ref = ref_swiglu(x, ffn.w1.weight.detach(), ffn.w2.weight.detach(), ffn.w3.weight.detach())
    torch.testing.assert_close(ffn(x).double(), ref, **TOL)


def test_linear_is_x_times_w_transposed() -> None:
    lin = Linear(6, 4)
    assert lin.weight.shape == (4, 6)
    x = torch.randn(3, 6)
    torch.testing.assert_close(lin(x).double(), torch.einsum("bi,oi->bo", x.double(), lin.weight.double()), **TOL)


@pytest.mark.parametrize("start_pos", [0, 5])
def test_rope_interleaved_pairs(start_pos: int) -> None:
    rope = RotaryEmbedding(theta=500.0, d_head=8, max_seq_len=16)
    x = torch.randn(2, 3, 6, 8)  # (B, H, T, d_head)
    torch.testing.assert_close(rope(x, start_pos).double(), ref_rope(x, 500.0, start_pos), **TOL)
    # Norm-preserving rotation, and position 0 is the identity.
    torch.testing.assert_close(rope(x, start_pos).norm(dim=-1), x.norm(dim=-1))
    if start_pos == 0:
        torch.testing.assert_close(rope(x)[..., 0, :], x[..., 0, :])


def test_rope_tables_are_not_in_state_dict() -> None:
    model = _model()
    assert not any("cos" in k or "sin" in k for k in model.state_dict())
    assert {name.rsplit(".", 1)[-1] for name, _ in model.named_buffers()} == {"cos", "sin"}


def test_attention_matches_naive_softmax() -> None:
    rope = RotaryEmbedding(10000.0, 8, 16)
    attn = MultiHeadSelfAttention(32, 4, rope)
    x = torch.randn(2, 9, 32)
    sd = {k: v.detach() for k, v in attn.state_dict().items()}
    torch.testing.assert_close(attn(x).double(), ref_attention(x, sd, "", 4, 10000.0), **TOL)


def test_block_matches_reference() -> None:
    rope = RotaryEmbedding(10000.0, 16, 16)
    block = TransformerBlock(32, 2, 48, rope)
    with torch.no_grad():  # non-unit gains so a swapped/missing norm would show
        block.ln1.weight.uniform_(0.5, 1.5)
        block.ln2.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 10, 32)
    sd = {k: v.detach() for k, v in block.state_dict().items()}
    torch.testing.assert_close(block(x).double(), ref_block(x, sd, "", 2, 10000.0), **TOL)


def test_hand_built_state_dict_loads_strict_and_matches_reference_lm() -> None:
    cfg = ModelConfig(**{**DEBUG, "rope_theta": 1000.0})
    sd = random_state_dict(cfg)
    model = TransformerLM(cfg)
    model.load_state_dict(sd, strict=True)
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    logits = model(idx)
    assert logits.shape == (2, 12, cfg.vocab_size)
    torch.testing.assert_close(logits.double(), ref_lm(idx, sd, cfg), atol=1e-4, rtol=1e-4)


def test_state_dict_keys_and_shapes_exact() -> None:
    cfg = ModelConfig(**DEBUG)
    sd = TransformerLM(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_shapes(cfg)
    assert list(sd) == list(expected_shapes(cfg))  # also the canonical order
    model = TransformerLM(cfg)
    assert all(name.endswith(".weight") for name, _ in model.named_parameters())  # no biases


def test_causality() -> None:
    model = _model()
    idx = torch.randint(0, 257, (2, 20))
    t = 11
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 257
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_forward_rejects_too_long_input() -> None:
    with pytest.raises(ValueError, match=r"exceed context_length \(32\)"):
        _model()(torch.zeros(1, 33, dtype=torch.long))


def test_chunked_forward_with_kv_cache_matches_full_forward() -> None:
    model = _model()
    idx = torch.randint(0, 257, (2, 20))
    full = model(idx)
    cache = KVCache(model.config.num_layers, model.config.context_length)
    chunks = [model(idx[:, a:b], kv_cache=cache) for a, b in ((0, 5), (5, 6), (6, 13), (13, 20))]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Init


def test_init_statistics() -> None:
    lin = Linear(256, 512)
    std = math.sqrt(2 / (256 + 512))
    w = lin.weight.detach()
    assert w.abs().max() <= 3 * std + 1e-6
    # A normal truncated at +-3 sigma has std 0.98658 sigma.
    assert w.std().item() == pytest.approx(0.98658 * std, rel=0.02)
    assert w.mean().abs().item() < 0.1 * std

    model = TransformerLM(ModelConfig.from_config_file(CONFIGS / "quickstart.yaml", vocab_size=2048))
    emb = model.token_embeddings.weight.detach()
    assert emb.abs().max() <= 3.0 + 1e-6
    assert emb.std().item() == pytest.approx(0.98658, rel=0.02)
    for name, p in model.named_parameters():
        if name.endswith(("ln1.weight", "ln2.weight", "ln_final.weight")):
            assert torch.equal(p, torch.ones_like(p)), name
        elif p.dim() == 2 and "token_embeddings" not in name:
            d_out, d_in = p.shape
            s = math.sqrt(2 / (d_in + d_out))
            assert p.abs().max().item() <= 3 * s + 1e-6, name
            assert p.std().item() == pytest.approx(0.98658 * s, rel=0.1), name


# ----------------------------------------------------------------------------------------------------------------------
# Config, presets, accounting


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (dict(d_model=100, num_heads=3), r"d_model \(100\) must be divisible by num_heads \(3\)"),
        (dict(num_layers=0), r"num_layers \(0\)"),
        (dict(vocab_size=-5), r"vocab_size \(-5\)"),
        (dict(d_ff=64.0), r"d_ff \(64\.0\)"),
        (dict(d_model=30, num_heads=2), r"even"),
        (dict(rope_theta=0.0), r"rope_theta \(0\.0\)"),
    ],
)
def test_config_validation_names_the_field(overrides: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        ModelConfig(**{**DEBUG, **overrides})


def test_shipped_configs_are_the_presets() -> None:
    # The YAML files in configs/ are the single source of the shipped model sizes.
    assert {p.stem for p in CONFIGS.glob("*.yaml")} >= {"debug", "quickstart", "tinystories-17m"}
    with pytest.raises(ValueError, match=r"unknown model field\(s\) \['d_modle'\]"):
        ModelConfig.from_config_file(CONFIGS / "debug.yaml", d_modle=3)
    assert ModelConfig.from_config_file(CONFIGS / "debug.yaml", vocab_size=300).vocab_size == 300
    ts = ModelConfig.from_config_file(CONFIGS / "tinystories-17m.yaml", vocab_size=10000)
    expected = dict(vocab_size=10000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344)
    assert ts.to_dict() == {**expected, "rope_theta": 10000.0}
    for name in ("debug", "quickstart"):
        cfg = ModelConfig.from_config_file(CONFIGS / f"{name}.yaml", vocab_size=257)
        TransformerLM(cfg)(torch.zeros(1, cfg.context_length, dtype=torch.long))


def test_tinystories_parameter_count_and_flops() -> None:
    with torch.device("meta"):  # shapes only: skips ~1 s of initialising 22.7M weights
        model = TransformerLM(ModelConfig.from_config_file(CONFIGS / "tinystories-17m.yaml", vocab_size=10000))
    # By hand: per layer 4*512^2 (attn) + 3*512*1344 (ffn) + 2*512 (norms) = 1,048,576 + 2,064,384 + 1,024.
    per_layer = 3_113_984
    embedding = 10000 * 512  # token_embeddings, and again for the untied lm_head
    assert model.num_parameters() == 4 * per_layer + 512 + 2 * embedding == 22_696_448
    assert model.num_parameters(non_embedding=True) == 4 * per_layer + 512 + embedding == 17_576_448
    n_matmul = 4 * (4 * 512**2 + 3 * 512 * 1344) + 10000 * 512
    assert model.flops_per_token() == 6 * n_matmul + 6 * 4 * 256 * 512
    assert model.flops_per_token(128) == 6 * n_matmul + 6 * 4 * 128 * 512


# ----------------------------------------------------------------------------------------------------------------------
# Generation


def test_greedy_with_and_without_cache_identical() -> None:
    model = _model()
    prompts = torch.randint(0, 257, (3, 6))
    cached = model.generate(prompts, 20, temperature=0)
    uncached = model.generate(prompts, 20, temperature=0, use_cache=False)
    assert cached == uncached
    assert all(len(row) == 20 for row in cached)


def test_kv_cache_feeds_one_position_per_new_token() -> None:
    model = _model()
    seen: list[tuple[int, ...]] = []
    handle = model.token_embeddings.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    model.generate(torch.randint(0, 257, (2, 7)), 5, temperature=0)
    handle.remove()
    assert seen == [(2, 7)] + [(2, 1)] * 4


def test_ragged_prompts_equal_per_row_generation() -> None:
    model = _model()
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    out = model.generate(prompts, 6, temperature=0)
    assert out == [model.generate([p], 6, temperature=0)[0] for p in prompts]
    # Equal-length lists batch like a tensor; a 1-D tensor is one row.
    assert model.generate([[1, 2], [3, 4]], 4, temperature=0) == model.generate(torch.tensor([[1, 2], [3, 4]]), 4, 0)
    assert model.generate(torch.tensor([1, 2, 3]), 4, temperature=0) == [
        out[0][:0] + model.generate([[1, 2, 3]], 4, 0)[0]
    ]


def test_eos_stops_a_row() -> None:
    model = _model()
    prompts = torch.randint(0, 257, (4, 5))
    full = model.generate(prompts, 12, temperature=0)
    eos = full[0][3]
    expected = [row[: row.index(eos)] if eos in row else row for row in full]
    assert model.generate(prompts, 12, temperature=0, eos_id=eos) == expected
    assert len(expected[0]) <= 3


def test_context_window_fills_then_stops() -> None:
    model = _model()  # context_length 32
    prompt = torch.randint(0, 257, (1, 30))
    # Forward passes may use 30, 31, 32 positions -> 3 new tokens, with or without the cache.
    assert len(model.generate(prompt, 10, temperature=0)[0]) == 3
    assert model.generate(prompt, 10, temperature=0) == model.generate(prompt, 10, temperature=0, use_cache=False)
    long_prompt = torch.randint(0, 257, (1, 50))  # cropped to its last 32 tokens
    assert model.generate(long_prompt, 5, temperature=0) == model.generate(long_prompt[:, -32:], 5, temperature=0)


def test_tiny_top_p_is_greedy() -> None:
    model = _model()
    prompts = torch.randint(0, 257, (2, 4))
    g = torch.Generator().manual_seed(1)
    assert model.generate(prompts, 10, temperature=1.0, top_p=1e-6, generator=g) == model.generate(prompts, 10, 0)


def test_sampling_reproducible_with_generator() -> None:
    model = _model()
    prompts = torch.randint(0, 257, (2, 4))

    def sample(seed: int, top_p: float = 1.0) -> list[list[int]]:
        return model.generate(prompts, 15, temperature=1.5, top_p=top_p, generator=torch.Generator().manual_seed(seed))

    assert sample(7) == sample(7)
    assert sample(7, top_p=0.5) == sample(7, top_p=0.5)
    assert sample(7) != sample(8)  # 30 draws at high temperature from 257 tokens: a collision is ~impossible


def test_generate_restores_mode_and_validates() -> None:
    model = _model()
    model.train()
    model.generate([[1, 2]], 2)
    assert model.training
    model.eval()
    model.generate([[1, 2]], 2)
    assert not model.training
    with pytest.raises(ValueError, match="top_p"):
        model.generate([[1]], 2, top_p=0.0)
    with pytest.raises(ValueError, match=r"\[0, 257\)"):
        model.generate([[300]], 2)
    assert model.generate([[1], [2]], 0) == [[], []]


# ----------------------------------------------------------------------------------------------------------------------
# CS336 checkpoints


def _trained_pair() -> tuple[TransformerLM, torch.optim.Optimizer]:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, 257, (2, 9))
    loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    opt.step()
    return model, opt


def test_cs336_checkpoint_round_trip(tmp_path) -> None:
    model, opt = _trained_pair()
    path = tmp_path / "ckpt.pt"
    save_cs336_checkpoint(model, opt, 123, path)

    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model", "optimizer", "iteration"} and raw["iteration"] == 123

    model2 = _model()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    assert load_cs336_checkpoint(path, model2, opt2) == 123
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        assert torch.equal(s1["state"][i]["exp_avg_sq"], s2["state"][i]["exp_avg_sq"])

    # Without an optimizer (file object this time).
    buf = io.BytesIO()
    save_cs336_checkpoint(model, None, 7, buf)
    buf.seek(0)
    assert load_cs336_checkpoint(buf, _model()) == 7
    buf.seek(0)
    with pytest.raises(ValueError, match="no optimizer state"):
        load_cs336_checkpoint(buf, model2, opt2)


def test_cs336_checkpoint_from_compiled_model(tmp_path) -> None:
    model = _model()
    sd = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    torch.save({"model": sd, "optimizer": None, "iteration": 5}, tmp_path / "c.pt")
    model2 = _model()
    assert load_cs336_checkpoint(tmp_path / "c.pt", model2) == 5
    assert torch.equal(model2.lm_head.weight, model.lm_head.weight)


def test_cs336_checkpoint_mismatch_messages(tmp_path) -> None:
    save_cs336_checkpoint(_model(), None, 1, tmp_path / "a.pt")
    with pytest.raises(ValueError) as err:
        load_cs336_checkpoint(tmp_path / "a.pt", _model(vocab_size=300))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("checkpoint has token_embeddings.weight (257, 32) but the model expects (300, 32)")
    assert "(and 1 more mismatched tensors)" in msg and "pass the matching model config" in msg

    with pytest.raises(ValueError, match=r"checkpoint lacks layers\.2\.ln1\.weight \(and 8 more\)"):
        load_cs336_checkpoint(tmp_path / "a.pt", _model(num_layers=3))
    with pytest.raises(ValueError, match=r"unexpected layers\.1\.ln1\.weight \(and 8 more\)"):
        load_cs336_checkpoint(tmp_path / "a.pt", _model(num_layers=1))
    torch.save({"state_dict": {}}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="not a CS336 checkpoint"):
        load_cs336_checkpoint(tmp_path / "b.pt", _model())

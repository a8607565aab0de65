"""The CS336 (Stanford, assignment 1) transformer language model, in one readable file.

Size note (~740 lines): nanoGPT-style, the whole model is meant to be read top to bottom in one file; the CS336
building blocks keep the assignment's exact class signatures (``Linear``, ``Embedding``, ... each with its own
``device``/``dtype`` constructor), which is why their constructors look alike.

The architecture is reproduced *exactly*, parameter names and shapes included, so a state dict written by a CS336
implementation loads here with ``load_state_dict(strict=True)`` and vice versa:

- token embedding -> ``num_layers`` pre-norm blocks -> final RMSNorm -> untied LM head; no biases anywhere,
  no positional embedding (RoPE instead), no embedding scaling;
- block: ``x = x + attn(ln1(x))``, ``x = x + ffn(ln2(x))``;
- attention: causal multi-head self-attention, heads laid out head-major (``view(B, T, num_heads, d_head)``),
  interleaved RoPE on queries and keys;
- feed-forward: SwiGLU ``w2(silu(w1 x) * w3 x)``;
- every Linear stores its weight as ``(d_out, d_in)`` and is initialised with a truncated normal.

State-dict keys (``V`` = vocab_size, ``D`` = d_model, ``F`` = d_ff)::

    token_embeddings.weight          (V, D)
    layers.{i}.ln1.weight            (D,)
    layers.{i}.attn.q_proj.weight    (D, D)      also k_proj, v_proj, output_proj
    layers.{i}.ln2.weight            (D,)
    layers.{i}.ffn.w1.weight         (F, D)
    layers.{i}.ffn.w2.weight         (D, F)
    layers.{i}.ffn.w3.weight         (F, D)
    ln_final.weight                  (D,)
    lm_head.weight                   (V, D)

On top of the assignment this file adds a KV cache for incremental decoding, ``generate`` (temperature + nucleus
sampling), parameter / FLOP counting for MFU, and helpers that read and write CS336-format checkpoints.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Embedding",
    "KVCache",
    "LayerKVCache",
    "Linear",
    "ModelConfig",
    "MultiHeadSelfAttention",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "TransformerBlock",
    "TransformerLM",
]

# ----------------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ModelConfig:
    """Hyperparameters of the CS336 transformer LM. Validated on construction."""

    # Defaults: the quickstart model's sizes (configs/quickstart.yaml states them too, for the reader of the config).
    vocab_size: int = 2048
    """Number of token ids; the embedding and LM-head row count (``cs336 fit`` links it from ``data.vocab_size``)."""
    context_length: int = 128
    """Maximum sequence length the model accepts (also the size of the RoPE tables and of the KV cache)."""
    d_model: int = 128
    """Width of the residual stream."""
    num_layers: int = 4
    """Number of transformer blocks."""
    num_heads: int = 4
    """Number of attention heads; must divide d_model, and d_model / num_heads must be even (RoPE rotates pairs)."""
    d_ff: int = 344
    """Inner width of the SwiGLU feed-forward (CS336 uses about 8/3 * d_model, rounded to a multiple of 64)."""
    rope_theta: float = 10000.0
    """RoPE base: the pair j of a head is rotated by position * rope_theta ** (-2j / d_head)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff"):
            value = getattr(self, name)
            # bool is an int subclass; a stray True would silently mean 1.
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} ({value!r}) must be a positive int")
        if self.d_model % self.num_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if self.d_head % 2 != 0:
            raise ValueError(
                f"d_model / num_heads ({self.d_model} / {self.num_heads} = {self.d_head}) must be even: "
                "RoPE rotates pairs of dimensions"
            )
        if isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, int | float):
            raise ValueError(f"rope_theta ({self.rope_theta!r}) must be a positive number")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ValueError(f"rope_theta ({self.rope_theta!r}) must be a positive finite number")
        self.rope_theta = float(self.rope_theta)

    @property
    def d_head(self) -> int:
        """Width of one attention head, ``d_model // num_heads``."""
        return self.d_model // self.num_heads

    @classmethod
    def from_config_file(cls, path: str | os.PathLike[str], **overrides: Any) -> ModelConfig:
        """The model of a ``cs336 fit`` YAML config (its ``model:`` section): the files in ``configs/`` are the one
        source of the shipped sizes (``debug``, ``quickstart``, ``tinystories-17m``).

        Args:
            path: A LightningCLI config file.
            **overrides: Fields to set or change; usually ``vocab_size``, which ``cs336 fit`` links from the prepared
                data rather than the config (the default is 2048).

        Raises:
            ValueError: If ``overrides`` names a field ModelConfig does not have.
        """
        import yaml

        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        section = data.get("model") or {}
        section = section.get("init_args", section)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown model field(s) {unknown}; known: {sorted(names)}")
        values = {k: v for k, v in section.items() if k in names} | overrides
        return cls(**values)

    def to_dict(self) -> dict[str, int | float]:
        """The fields as a plain dict (for hyperparameter logging)."""
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks (the CS336 classes)


def _trunc_normal_(weight: Tensor, std: float) -> None:
    # CS336 truncates every init at +-3 std: no outlier weights at step 0.
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3.0 * std, b=3.0 * std)


class Linear(nn.Module):
    """Bias-free linear map ``y = x W^T`` with ``W`` stored as ``(d_out, d_in)`` (same layout as ``nn.Linear``).

    Args:
        in_features: Input width ``d_in``.
        out_features: Output width ``d_out``.
        device: Where to allocate the weight.
        dtype: Weight dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated normal, std ``sqrt(2 / (d_in + d_out))`` (Glorot-style variance), cut at +-3 std."""
        _trunc_normal_(self.weight, math.sqrt(2.0 / (self.in_features + self.out_features)))

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(..., d_in)`` to ``(..., d_out)``."""
        return F.linear(x, self.weight)  # == einsum("...i,oi->...o"), but hits the fused GEMM path

    def extra_repr(self) -> str:
        return f"d_in={self.in_features}, d_out={self.out_features}"


class Embedding(nn.Module):
    """Token-id lookup table of shape ``(num_embeddings, embedding_dim)``.

    Args:
        num_embeddings: Vocabulary size.
        embedding_dim: Vector width ``d_model``.
        device: Where to allocate the weight.
        dtype: Weight dtype.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated normal, std 1, cut at +-3."""
        _trunc_normal_(self.weight, 1.0)

    def forward(self, token_ids: Tensor) -> Tensor:
        """Look up ``(...)`` integer ids, giving ``(..., embedding_dim)``."""
        return self.weight[token_ids]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class RMSNorm(nn.Module):
    """Root-mean-square layer norm: ``x / sqrt(mean(x^2) + eps) * g``, no mean subtraction, no bias.

    Args:
        d_model: Normalised (last) dimension.
        eps: Added under the square root.
        device: Where to allocate the gain.
        dtype: Gain dtype.
    """

    def __init__(
        self,
        d_model: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        """Gains start at 1, so the norm is a pure rescale at init."""
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``(..., d_model)``; the result has the input's dtype."""
        in_dtype = x.dtype
        # Square-and-mean in bf16/fp16 loses too much precision (and can overflow in fp16), so upcast.
        x = x.float()
        rms_inv = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (..., 1)
        return (x * rms_inv * self.weight.float()).to(in_dtype)

    def extra_repr(self) -> str:
        return f"{self.d_model}, eps={self.eps}"


class SwiGLU(nn.Module):
    """Gated feed-forward ``w2(silu(w1 x) * w3 x)``.

    Args:
        d_model: Input and output width.
        d_ff: Inner (gate) width.
        device: Where to allocate the weights.
        dtype: Weight dtype.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.w1 = Linear(d_model, d_ff, device=device, dtype=dtype)  # gate
        self.w2 = Linear(d_ff, d_model, device=device, dtype=dtype)  # down projection
        self.w3 = Linear(d_model, d_ff, device=device, dtype=dtype)  # value

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(..., d_model)`` to ``(..., d_model)``."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (..., d_ff) inside


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with the *interleaved* pairing used by CS336 (and the RoFormer paper).

    Dimension pair ``(x[..., 2j], x[..., 2j+1])`` at position ``p`` is rotated by the angle
    ``p * theta ** (-2j / d_head)``. Note this differs from the "rotate-half" layout of GPT-NeoX / Llama-HF,
    which pairs ``j`` with ``j + d_head / 2``; the two are not interchangeable on the same weights.

    The cos/sin tables are non-persistent buffers: they follow ``.to(device)`` but are not in the state dict, so
    CS336 checkpoints (which do not contain them either) load with ``strict=True``.

    Args:
        theta: RoPE base.
        d_head: Width of the vectors to rotate (one attention head); must be even.
        max_seq_len: Number of positions to precompute.
        device: Where to allocate the tables.
    """

    cos: Tensor
    sin: Tensor

    def __init__(self, theta: float, d_head: int, max_seq_len: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        if d_head % 2 != 0:
            raise ValueError(f"d_head ({d_head}) must be even for RoPE")
        self.theta = theta
        self.d_head = d_head
        self.max_seq_len = max_seq_len
        # float64 while building: at position 10^4 a float32 angle is already off in the 4th digit.
        inv_freq = theta ** (-torch.arange(0, d_head, 2, dtype=torch.float64, device=device) / d_head)  # (d_head/2,)
        positions = torch.arange(max_seq_len, dtype=torch.float64, device=device)  # (max_seq_len,)
        angles = torch.outer(positions, inv_freq)  # (max_seq_len, d_head/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor, start_pos: int = 0) -> Tensor:
        """Rotate ``x`` of shape ``(..., T, d_head)`` whose rows sit at positions ``start_pos .. start_pos + T - 1``.

        Args:
            x: Queries or keys, sequence in the second-to-last dimension.
            start_pos: Position of the first row (the KV-cache length during incremental decoding).

        Returns:
            The rotated tensor, same shape and dtype.
        """
        T = x.shape[-2]
        if start_pos + T > self.max_seq_len:
            raise ValueError(f"RoPE positions up to {start_pos + T} exceed max_seq_len ({self.max_seq_len})")
        cos = self.cos[start_pos : start_pos + T].to(x.dtype)  # (T, d_head/2)
        sin = self.sin[start_pos : start_pos + T].to(x.dtype)  # (T, d_head/2)
        x_even, x_odd = x[..., 0::2], x[..., 1::2]  # (..., T, d_head/2) each: the interleaved pairs
        rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)  # (..., T, d/2, 2)
        return rotated.flatten(-2)  # (..., T, d_head), pairs back in their interleaved slots

    def extra_repr(self) -> str:
        return f"theta={self.theta}, d_head={self.d_head}, max_seq_len={self.max_seq_len}"


# ----------------------------------------------------------------------------------------------------------------------
# KV cache


class LayerKVCache:
    """One layer's rotated keys and values for positions ``[0, length)``, preallocated to ``max_len``.

    Buffers are allocated lazily on the first write so they take the dtype and device the keys actually have
    (e.g. bf16 under autocast).
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.k: Tensor | None = None  # (B, H, max_len, d_head)
        self.v: Tensor | None = None  # (B, H, max_len, d_head)

    def update(self, k: Tensor, v: Tensor, start_pos: int) -> tuple[Tensor, Tensor]:
        """Store ``k``, ``v`` of shape ``(B, H, T, d_head)`` at ``start_pos`` and return all keys/values so far.

        Returns:
            Keys and values for positions ``[0, start_pos + T)``, each ``(B, H, start_pos + T, d_head)``.
        """
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; writing up to {end}")
        if self.k is None or self.v is None:
            B, H, _, d_head = k.shape
            self.k = k.new_zeros(B, H, self.max_len, d_head)
            self.v = v.new_zeros(B, H, self.max_len, d_head)
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of every layer, for incremental decoding with :meth:`TransformerLM.forward`.

    ``length`` is the number of positions already processed; the model advances it after each forward, and uses it
    as the RoPE offset of the new tokens.

    Args:
        num_layers: One :class:`LayerKVCache` per block.
        max_len: Capacity in positions (normally ``context_length``).
    """

    def __init__(self, num_layers: int, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.layers = [LayerKVCache(max_len) for _ in range(num_layers)]


# ----------------------------------------------------------------------------------------------------------------------
# Attention and the transformer block


class MultiHeadSelfAttention(nn.Module):
    """Causal multi-head self-attention with RoPE on queries and keys, via ``F.scaled_dot_product_attention``.

    Projections are ``(d_model, d_model)`` with heads head-major: output column block ``h * d_head:(h+1) * d_head``
    of ``q_proj`` is head ``h`` (i.e. ``view(B, T, num_heads, d_head)``), matching CS336.

    Args:
        d_model: Residual width.
        num_heads: Number of heads.
        rope: The rotary embedding to apply (shared by all layers; it has no parameters).
        device: Where to allocate the weights.
        dtype: Weight dtype.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        rope: RotaryEmbedding,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.d_model = d_model
        self.num_heads = num_heads
        self.d_head = d_model // num_heads
        self.q_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.k_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.v_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.output_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.rope = rope

    def forward(self, x: Tensor, start_pos: int = 0, kv_cache: LayerKVCache | None = None) -> Tensor:
        """Attend causally over ``x`` (and over the cached prefix, if any).

        Args:
            x: ``(B, T, d_model)``, the tokens at positions ``start_pos .. start_pos + T - 1``.
            start_pos: Absolute position of ``x[:, 0]``; nonzero only with a cache.
            kv_cache: This layer's cache; the new keys/values are appended to it.

        Returns:
            ``(B, T, d_model)``.
        """
        B, T, _ = x.shape
        H, d_head = self.num_heads, self.d_head
        q = self.q_proj(x).view(B, T, H, d_head).transpose(1, 2)  # (B, H, T, d_head)
        k = self.k_proj(x).view(B, T, H, d_head).transpose(1, 2)  # (B, H, T, d_head)
        v = self.v_proj(x).view(B, T, H, d_head).transpose(1, 2)  # (B, H, T, d_head)
        # Position enters only through q.k, so only queries and keys are rotated; values carry content.
        q = self.rope(q, start_pos)
        k = self.rope(k, start_pos)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v, start_pos)  # (B, H, S, d_head) with S = start_pos + T
        S = k.shape[2]
        if S == T:
            # Plain causal attention (training, or the prefill of an empty cache): lets SDPA use its fused kernels.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, d_head)
        elif T == 1:
            # One new token may see every cached position: no mask at all.
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            # Several new tokens after a cached prefix. is_causal would align the mask to the top-left (query i sees
            # keys <= i), which is wrong here, so spell out "key position <= query position".
            q_pos = torch.arange(start_pos, S, device=x.device)  # (T,)
            k_pos = torch.arange(S, device=x.device)  # (S,)
            mask = k_pos[None, :] <= q_pos[:, None]  # (T, S), True = attend
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, self.d_model)  # (B, T, d_model), heads concatenated head-major
        return self.output_proj(y)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x = x + attn(ln1(x))``, then ``x = x + ffn(ln2(x))``.

    Pre-norm keeps the residual stream an identity path from embedding to head, which is what makes these models
    train stably without warmup tricks on the norms.

    Args:
        d_model: Residual width.
        num_heads: Attention heads.
        d_ff: SwiGLU inner width.
        rope: Shared rotary embedding.
        device: Where to allocate the weights.
        dtype: Weight dtype.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        rope: RotaryEmbedding,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.ln1 = RMSNorm(d_model, device=device, dtype=dtype)
        self.attn = MultiHeadSelfAttention(d_model, num_heads, rope, device=device, dtype=dtype)
        self.ln2 = RMSNorm(d_model, device=device, dtype=dtype)
        self.ffn = SwiGLU(d_model, d_ff, device=device, dtype=dtype)

    def forward(self, x: Tensor, start_pos: int = 0, kv_cache: LayerKVCache | None = None) -> Tensor:
        """Map ``(B, T, d_model)`` to ``(B, T, d_model)``; see :meth:`MultiHeadSelfAttention.forward`."""
        x = x + self.attn(self.ln1(x), start_pos, kv_cache)  # (B, T, C)
        x = x + self.ffn(self.ln2(x))  # (B, T, C)
        return x


# ----------------------------------------------------------------------------------------------------------------------
# The language model


class TransformerLM(nn.Module):
    """The CS336 transformer language model.

    Args:
        config: Architecture hyperparameters.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embeddings = Embedding(config.vocab_size, config.d_model)
        # One RoPE table for all layers: it has no parameters, and sharing keeps a single copy on the device.
        rope = RotaryEmbedding(config.rope_theta, config.d_head, config.context_length)
        self.layers = nn.ModuleList(
            TransformerBlock(config.d_model, config.num_heads, config.d_ff, rope) for _ in range(config.num_layers)
        )
        self.ln_final = RMSNorm(config.d_model)
        self.lm_head = Linear(config.d_model, config.vocab_size)  # untied from token_embeddings, as in CS336

    # -- forward ---------------------------------------------------------------------------------------------------

    def _hidden(self, idx: Tensor, kv_cache: KVCache | None) -> Tensor:
        """Residual stream after the last block (before ``ln_final``), ``(B, T, d_model)``."""
        if idx.dim() != 2:
            raise ValueError(f"expected token ids of shape (batch, seq_len), got shape {tuple(idx.shape)}")
        T = idx.shape[1]
        start_pos = 0 if kv_cache is None else kv_cache.length
        if start_pos + T > self.config.context_length:
            where = f"{T} tokens" if start_pos == 0 else f"{T} tokens after {start_pos} cached ones"
            raise ValueError(
                f"sequence too long: {where} exceed context_length ({self.config.context_length}); "
                "crop the input or build the model with a larger context_length"
            )
        x = self.token_embeddings(idx)  # (B, T, C)
        for i, block in enumerate(self.layers):
            x = block(x, start_pos, None if kv_cache is None else kv_cache.layers[i])  # (B, T, C)
        if kv_cache is not None:
            kv_cache.length += T  # only after every layer has written its keys for these positions
        return x

    def forward(self, idx: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        """Next-token logits for every position.

        Args:
            idx: Token ids, ``(B, T)`` long tensor.
            kv_cache: For incremental decoding: ``idx`` continues the sequence already in the cache (RoPE positions
                start at ``kv_cache.length``), and its keys/values are appended. ``None`` for training.

        Returns:
            Unnormalised logits ``(B, T, vocab_size)``.

        Raises:
            ValueError: If the (cached + new) length exceeds ``config.context_length``.
        """
        x = self._hidden(idx, kv_cache)  # (B, T, C)
        return self.lm_head(self.ln_final(x))  # (B, T, V)

    # -- accounting --------------------------------------------------------------------------------------------------

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Count parameters.

        Args:
            non_embedding: Exclude ``token_embeddings`` (a table lookup: no FLOPs). ``lm_head`` is *kept*: it is a
                real matmul (Kaplan et al. count it, since their embeddings are tied), and with it the
                ``tinystories-17m`` config (``configs/tinystories-17m.yaml``) has the 17.6M parameters of its name.

        Returns:
            The number of scalar parameters.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.token_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward, backward = 2x forward), counting matmuls only.

        ``6 * N + 6 * num_layers * seq_len * d_model``, where

        - ``N`` = parameters that take part in a matmul: every Linear, ``lm_head`` included, i.e.
          ``num_layers * (4 d_model^2 + 3 d_model d_ff) + vocab_size * d_model`` (no embedding lookup, no norm
          gains). Each such weight costs 2 FLOPs per token forward, 4 backward.
        - the attention term is PaLM's (Chowdhery et al. 2022, appendix B) ``12 * L * H * Q * T`` with
          ``H * Q = d_model`` (QK^T and AV, 2 FLOPs per multiply-add, x3 for training), halved because causal
          attention only needs the lower triangle (which the fused SDPA kernels do skip).

        Softmax, norms, SwiGLU gating and RoPE are elementwise and left out, as usual for MFU.

        Args:
            seq_len: Sequence length the model is trained at; defaults to ``config.context_length``.

        Returns:
            FLOPs per token, as a float.
        """
        cfg = self.config
        T = cfg.context_length if seq_len is None else seq_len
        if T <= 0:
            raise ValueError(f"seq_len ({T}) must be positive")
        n_matmul = cfg.num_layers * (4 * cfg.d_model**2 + 3 * cfg.d_model * cfg.d_ff) + cfg.vocab_size * cfg.d_model
        return float(6 * n_matmul + 6 * cfg.num_layers * T * cfg.d_model)

    # -- generation --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor | Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> list[list[int]]:
        """Sample continuations of one or more prompts.

        Prompts of equal length are decoded as one batch. Ragged prompts (a list of lists of different lengths) are
        decoded one row at a time, in order, sharing ``generator``: exact (no padding tokens for RoPE or the mask
        to account for), at the price of batching. Rows that hit ``eos_id`` stop; the batch stops when every row has.

        The context window does not slide: a prompt longer than ``context_length`` keeps only its last
        ``context_length`` tokens, and decoding stops early once the sequence fills the window (at most
        ``context_length + 1 - len(prompt)`` new tokens). Sliding would require re-encoding the whole window
        each step, since cached keys carry absolute RoPE positions.

        The model is put in eval mode for the call and its previous train/eval mode restored afterwards.

        Args:
            prompt_ids: ``(B, T)`` or ``(T,)`` long tensor, or a list of token-id lists (each non-empty).
            max_new_tokens: Upper bound on new tokens per row.
            temperature: Softmax temperature; ``<= 0`` means greedy (argmax) decoding.
            top_p: Nucleus sampling: keep the smallest set of most likely tokens whose probability mass reaches
                ``top_p`` (the most likely token is always kept). ``1.0`` disables it.
            eos_id: Stop a row when this token is produced; the eos itself is not returned.
            generator: Random generator for ``torch.multinomial``, for reproducible sampling. Sampling runs on the
                generator's device.
            use_cache: Use the KV cache (one position of compute per new token). ``False`` re-runs the whole
                sequence each step; both give the same tokens.

        Returns:
            For each row, the list of new token ids (prompt excluded).
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= 0")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p ({top_p}) must be in (0, 1]")
        device = self.lm_head.weight.device
        if isinstance(prompt_ids, Tensor):
            rows = [prompt_ids.reshape(1, -1)] if prompt_ids.dim() == 1 else [prompt_ids]
            if rows[0].dim() != 2:
                raise ValueError(f"prompt_ids tensor must be (B, T) or (T,), got shape {tuple(prompt_ids.shape)}")
        else:
            lists = [list(p) for p in prompt_ids]
            if not lists:
                return []
            if len({len(p) for p in lists}) == 1:
                rows = [torch.tensor(lists, dtype=torch.long).reshape(len(lists), -1)]
            else:
                rows = [torch.tensor([p], dtype=torch.long) for p in lists]
        for row in rows:
            if row.numel() == 0 and row.shape[0] > 0:
                raise ValueError("every prompt needs at least one token")
            if row.numel() and (int(row.min()) < 0 or int(row.max()) >= self.config.vocab_size):
                raise ValueError(f"prompt token ids must be in [0, {self.config.vocab_size})")

        was_training = self.training
        self.eval()  # generation never wants dropout-style train behaviour (none today, but subclasses may add it)
        try:
            out: list[list[int]] = []
            for row in rows:
                out += self._generate_batch(
                    row.to(device=device, dtype=torch.long),
                    max_new_tokens,
                    temperature,
                    top_p,
                    eos_id,
                    generator,
                    use_cache,
                )
            return out
        finally:
            self.train(was_training)

    def _generate_batch(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        eos_id: int | None,
        generator: torch.Generator | None,
        use_cache: bool,
    ) -> list[list[int]]:
        """Decode one batch of equal-length prompts ``idx`` ``(B, T)``; see :meth:`generate`."""
        ctx = self.config.context_length
        B = idx.shape[0]
        seq = idx[:, -ctx:]  # (B, T) the prompt, cropped from the left to fit the window
        new_tokens: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        cache = KVCache(self.config.num_layers, ctx) if use_cache else None
        feed = seq  # what the next forward consumes: the whole prompt first, then one token at a time with a cache
        for _ in range(max_new_tokens):
            if B == 0 or seq.shape[1] > ctx:
                break  # the window is full: the next forward would need position `ctx`
            hidden = self._hidden(feed if cache is not None else seq, cache)  # (B, T_feed, C)
            logits = self.lm_head(self.ln_final(hidden[:, -1]))  # (B, V) only the last position is needed
            token = _sample_next(logits, temperature, top_p, generator)  # (B,)
            for b, t in enumerate(token.tolist()):
                if done[b]:
                    continue
                if eos_id is not None and t == eos_id:
                    done[b] = True
                else:
                    new_tokens[b].append(t)
            if all(done):
                break
            feed = token[:, None]  # (B, 1) finished rows keep decoding junk; cheaper than reshaping the batch
            seq = torch.cat((seq, feed), dim=1)  # (B, T + 1)
        return new_tokens


def _sample_next(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """Pick one token per row of ``logits`` ``(B, V)``: argmax if ``temperature <= 0``, else nucleus sampling."""
    logits = logits.float()  # bf16 softmax/cumsum would distort the nucleus boundary
    if temperature <= 0:
        return logits.argmax(dim=-1)  # (B,)
    probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)  # (B, V)
        # Drop a token if the tokens ranked above it already reach top_p. The top token has nothing above it
        # (mass 0 < top_p), so it always survives.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V)
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, sorted_idx, sorted_probs)  # (B, V), multinomial renormalises
    if generator is not None:
        probs = probs.to(generator.device)  # multinomial needs its generator on the same device
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1).to(logits.device)  # (B,)

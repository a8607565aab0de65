"""The CS336 checkpoint format, and converters between it and Lightning checkpoints of :class:`LanguageModel`.

A CS336 checkpoint is ``torch.save({"model": state_dict, "optimizer": state_dict or None, "iteration": int})``, what
the assignment's ``save_checkpoint``/``load_checkpoint`` read and write. Lightning's AdamW state has two parameter
groups (decay, no decay); CS336's has one in ``model.parameters()`` order, so the converters re-index it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import lightning as L
import torch
from torch import nn

from lightning_cs336.module import LanguageModel, _decay_split

__all__ = [
    "checkpoint_problem",
    "export_cs336_checkpoint",
    "import_cs336_checkpoint",
    "load_cs336_checkpoint",
    "read_checkpoint",
    "save_cs336_checkpoint",
]


_COMPILE_PREFIX = "_orig_mod."  # what torch.compile's OptimizedModule puts in front of every key


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under a ``torch.compile`` wrapper (or the module itself)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def save_cs336_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    iteration: int,
    out: str | os.PathLike[str] | IO[bytes],
) -> None:
    """Write a checkpoint in CS336's ``save_checkpoint`` format.

    The file is ``torch.save({"model": ..., "optimizer": ..., "iteration": ...})``; ``optimizer`` is ``None`` when
    no optimizer is given. A ``torch.compile``-d model is saved under its plain key names, so the file loads into
    an uncompiled model (and into any CS336 implementation).

    Args:
        model: The model (``TransformerLM`` or any CS336-compatible module).
        optimizer: Its optimizer, or ``None``.
        iteration: Training step to store.
        out: Path or writable binary file object.
    """
    torch.save(
        {
            "model": _unwrap(model).state_dict(),
            "optimizer": None if optimizer is None else optimizer.state_dict(),
            "iteration": int(iteration),
        },
        out,
    )


def _fmt_shape(shape: torch.Size) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _more(names: list[str]) -> str:
    return names[0] + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


def load_cs336_checkpoint(
    src: str | os.PathLike[str] | IO[bytes],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Load a CS336-format checkpoint into ``model`` (``strict=True``) and optionally ``optimizer``.

    Keys saved from a ``torch.compile``-d model (``_orig_mod.`` prefix) are accepted, and ``model`` itself may be
    compiled. Tensors are read onto the CPU and copied into the model's parameters wherever they live.

    Args:
        src: Path or readable binary file object.
        model: The model to fill; must have exactly the checkpoint's architecture.
        optimizer: If given, its state is restored too (the checkpoint must contain one).

    Returns:
        The stored iteration.

    Raises:
        ValueError: If the file is not a CS336 checkpoint, or its tensors do not match the model's names/shapes
            (one line naming the first mismatch), or an optimizer is requested but the checkpoint has none.
    """
    checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "iteration" not in checkpoint:
        keys = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"not a CS336 checkpoint: expected a dict with 'model' and 'iteration', got {keys}")
    state = {k.removeprefix(_COMPILE_PREFIX): v for k, v in checkpoint["model"].items()}
    target = _unwrap(model)
    expected = target.state_dict()

    hint = "the checkpoint is from a different architecture; pass the matching model config"
    wrong_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if wrong_shape:
        k = wrong_shape[0]
        more = f" (and {len(wrong_shape) - 1} more mismatched tensors)" if len(wrong_shape) > 1 else ""
        raise ValueError(
            f"checkpoint has {k} {_fmt_shape(state[k].shape)} but the model expects "
            f"{_fmt_shape(expected[k].shape)}{more}: {hint}"
        )
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"checkpoint lacks {_more(missing)}")
        if unexpected:
            parts.append(f"checkpoint has unexpected {_more(unexpected)}")
        raise ValueError(f"{' and '.join(parts)}: {hint}")

    target.load_state_dict(state, strict=True)
    if optimizer is not None:
        if checkpoint.get("optimizer") is None:
            raise ValueError("checkpoint has no optimizer state, but an optimizer was passed to restore")
        optimizer.load_state_dict(checkpoint["optimizer"])
    return int(checkpoint["iteration"])


def export_cs336_checkpoint(ckpt_path: str | Path, out: str | Path) -> Path:
    """Write a Lightning checkpoint of :class:`LanguageModel` as a CS336-format checkpoint.

    The result is ``{"model": state_dict, "optimizer": AdamW state or None, "iteration": global_step}`` via
    ``torch.save``, loadable by a CS336 ``load_checkpoint`` into the assignment's ``TransformerLM``.
    """
    ckpt = read_checkpoint(ckpt_path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(_not_lightning(ckpt_path, ckpt))
    try:
        lm = LanguageModel(**_model_kwargs(ckpt["hyper_parameters"]))
        lm.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(
            f"{ckpt_path} does not hold a LanguageModel its hyperparameters describe ({_first_line(e)}); "
            "pass a .ckpt written by `cs336 fit`"
        ) from e
    optimizer = None
    if ckpt.get("optimizer_states"):
        optimizer = torch.optim.AdamW(lm.model.parameters())
        try:
            optimizer.load_state_dict(
                _single_group(ckpt["optimizer_states"][0], lm.model, lm.hparams.decay_norm_and_embeddings)
            )
        except ValueError:
            optimizer = None  # parameter grouping differs: export the weights alone
    out = Path(out)
    with _atomic(out) as tmp:
        save_cs336_checkpoint(lm.model, optimizer, int(ckpt.get("global_step", 0)), tmp)
    return out


def import_cs336_checkpoint(
    src: str | Path,
    out: str | Path,
    num_heads: int,
    context_length: int,
    rope_theta: float = 10000.0,
    tokenizer: Any | None = None,
) -> Path:
    """Turn a CS336-format checkpoint into a Lightning checkpoint that ``LanguageModel.load_from_checkpoint`` (and
    ``cs336 generate --ckpt``) accepts. Shapes give every dimension except ``num_heads``, ``context_length`` and
    ``rope_theta``, which the caller passes.

    Args:
        src: The CS336 ``{"model", "optimizer", "iteration"}`` file.
        out: The Lightning checkpoint to write (written to a temporary name and renamed, so never half-written).
        num_heads: Attention heads (not recoverable from the shapes).
        context_length: The model's context length.
        rope_theta: RoPE base.
        tokenizer: The tokenizer the model was trained with (a :class:`~lightning_cs336.data.Tokenizer`); stored in
            the checkpoint as ``cs336 fit`` does, so ``cs336 generate`` needs nothing else. Its ids must fit the
            model's vocabulary.

    Raises:
        ValueError: ``src`` is not a readable CS336 checkpoint, the arguments do not fit its shapes, or the
            tokenizer has more ids than the model's vocabulary.
    """
    raw = read_checkpoint(src, weights_only=True)
    if not isinstance(raw, dict) or "model" not in raw or not isinstance(raw["model"], dict):
        hint = (
            " (it is a Lightning checkpoint: use it directly)" if isinstance(raw, dict) and "state_dict" in raw else ""
        )
        raise ValueError(f"{src} is not a CS336 checkpoint: expected a dict with a 'model' state dict{hint}")
    state = {k.removeprefix("_orig_mod."): v for k, v in raw["model"].items()}
    if "token_embeddings.weight" not in state or "layers.0.ffn.w1.weight" not in state:
        raise ValueError(f"{src} does not hold a CS336 TransformerLM state dict (no token_embeddings / layers.0.ffn)")
    vocab_size, d_model = state["token_embeddings.weight"].shape
    num_layers = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    d_ff = state["layers.0.ffn.w1.weight"].shape[0]
    try:
        lm = LanguageModel(
            vocab_size=int(vocab_size),
            context_length=context_length,
            d_model=int(d_model),
            num_layers=num_layers,
            num_heads=num_heads,
            d_ff=int(d_ff),
            rope_theta=rope_theta,
        )
    except ValueError as e:
        raise ValueError(
            f"cannot build the model of {src} (d_model={d_model}) with num_heads={num_heads}, "
            f"context_length={context_length}: {e}; pass the --num-heads and --context-length it was trained with"
        ) from e
    if tokenizer is not None and tokenizer.vocab_size > lm.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but {src} has vocab_size={lm.config.vocab_size}: it is not "
            "the tokenizer the model was trained with; pass --tokenizer with the data directory (or tokenizer.json) "
            "of its training data"
        )
    try:
        iteration = load_cs336_checkpoint(src, lm.model)
    except ValueError as e:
        problem = str(e).split(": the checkpoint is from a different architecture")[0]
        raise ValueError(
            f"{src} is not one CS336 TransformerLM: {problem}, though token_embeddings and layers.0 give vocab_size="
            f"{vocab_size}, d_model={d_model}, d_ff={d_ff}, {num_layers} layers; export it again from its model"
        ) from e
    checkpoint = {
        "state_dict": lm.state_dict(),
        "hyper_parameters": dict(lm.hparams),
        "global_step": iteration,
        "epoch": 0,
        "pytorch-lightning_version": L.__version__,
    }
    if tokenizer is not None:
        checkpoint["tokenizer"] = tokenizer.to_str()  # the key LanguageModel.on_load_checkpoint reads
    out = Path(out)
    with _atomic(out) as tmp:
        torch.save(checkpoint, tmp)
    return out


def read_checkpoint(path: str | os.PathLike[str], weights_only: bool = False) -> Any:
    """``torch.load`` a checkpoint file onto the CPU, with a damaged or foreign file as one clear ``ValueError``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a torch checkpoint, or a truncated / corrupt one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... depending on the damage
        raise ValueError(
            f"{path} is not a readable checkpoint ({_first_line(e)}): it is truncated, corrupt or not a torch file; "
            "copy or download it again, or pass another checkpoint"
        ) from e


def checkpoint_problem(path: str | os.PathLike[str], error: BaseException) -> str:
    """Why a checkpoint failed to load into :class:`LanguageModel`, in one line with the fix (for the CLI)."""
    raw = read_checkpoint(path)  # raises the clear error itself when the file is damaged
    if not isinstance(raw, dict) or "state_dict" not in raw or "hyper_parameters" not in raw:
        return _not_lightning(path, raw)
    return f"{path} could not be loaded as a `cs336 fit` checkpoint ({_first_line(error)}); pass one it wrote"


def _not_lightning(path: str | os.PathLike[str], raw: Any) -> str:
    if isinstance(raw, dict) and "model" in raw and "iteration" in raw:
        return (
            f"{path} is a CS336-format checkpoint, not a Lightning one: convert it first with `cs336 import-cs336 "
            f"--src {path} --out model.ckpt --num-heads N --context-length T --tokenizer DATA_DIR`"
        )
    keys = sorted(map(str, raw))[:6] if isinstance(raw, dict) else type(raw).__name__
    return f"{path} is not a `cs336 fit` checkpoint (no state_dict and hyper_parameters; it holds {keys})"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    return first.split(". ")[0].rstrip(".")  # torch's messages go on for paragraphs


@contextlib.contextmanager
def _atomic(out: Path) -> Iterator[Path]:
    """A temporary path beside ``out``, renamed onto ``out`` on success and removed on failure: no partial file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _model_kwargs(hparams: dict[str, Any]) -> dict[str, Any]:
    import inspect

    names = set(inspect.signature(LanguageModel.__init__).parameters) - {"self"}
    return {k: v for k, v in hparams.items() if k in names}


def _single_group(state: dict[str, Any], model: torch.nn.Module, decay_all: bool) -> dict[str, Any]:
    """Re-index Lightning's AdamW state (groups: decay, then no-decay) into one group in ``model.parameters()``
    order, the layout a CS336 ``AdamW(model.parameters())`` loads positionally."""
    decay, no_decay = _decay_split(model, decay_all)
    names = [n for n, _ in model.named_parameters()]
    lightning_order = decay + no_decay
    groups = state["param_groups"]
    flat_ids = [p for g in groups for p in g["params"]]
    new_state = {
        names.index(lightning_order[pos]): state["state"][pid]
        for pos, pid in enumerate(flat_ids)
        if pid in state["state"]
    }
    merged = {k: v for k, v in groups[0].items() if k not in ("params", "name")}
    merged["params"] = list(range(len(names)))
    return {"state": new_state, "param_groups": [merged]}

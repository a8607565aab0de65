"""The CS336 transformer LM as a LightningModule: loss, AdamW, the CS336 cosine schedule, and the duck-typed hooks
(``flops_per_token``, ``generate``, ``tokenizer``) that the telemetry callbacks look for.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import typing
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from lightning_cs336.model import ModelConfig, TransformerLM

__all__ = [
    "LanguageModel",
    "cosine_lr",
]


def _with_model_config_signature(cls: type) -> type:
    """Give ``cls.__init__`` the fields of ModelConfig as keyword-only parameters (types, defaults) in its signature,
    and their attribute docstrings in its Args docs: jsonargparse (LightningCLI) reads both, so the fields are
    declared once, in ModelConfig, and still appear as flat ``--model.<field>`` options with their help."""
    import docstring_parser

    hints = typing.get_type_hints(ModelConfig)
    own = [p for p in inspect.signature(cls.__init__).parameters.values() if p.kind != p.VAR_KEYWORD]
    model = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
        for f in dataclasses.fields(ModelConfig)
    ]
    cls.__init__.__signature__ = inspect.Signature(own + model)  # type: ignore[attr-defined]
    docs = {p.arg_name: p.description for p in docstring_parser.parse_from_object(ModelConfig).params}
    lines = "".join(f"        {name}: {' '.join((docs.get(name) or '').split())}\n" for name in _MODEL_FIELDS_ORDER)
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n" + lines + "    "
    return cls


_MODEL_FIELDS_ORDER = [f.name for f in dataclasses.fields(ModelConfig)]
_MODEL_FIELDS = frozenset(_MODEL_FIELDS_ORDER)


def cosine_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, cosine_steps: int) -> float:
    """The CS336 learning-rate schedule at optimizer step ``step`` (0-based).

    Linear warm-up ``step / warmup_steps * max_lr`` for ``step < warmup_steps``; cosine annealing from ``max_lr``
    down to ``min_lr`` until the absolute step ``cosine_steps``; ``min_lr`` afterwards.
    """
    if step < warmup_steps:
        return step / warmup_steps * max_lr
    if step <= cosine_steps:
        progress = (step - warmup_steps) / max(cosine_steps - warmup_steps, 1)
        return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)
    return min_lr


@_with_model_config_signature
class LanguageModel(L.LightningModule):
    """Next-token language modelling with the CS336 transformer.

    The model's own fields (``vocab_size``, ``context_length``, ``d_model``, ``num_layers``, ``num_heads``, ``d_ff``,
    ``rope_theta``) are :class:`~lightning_cs336.model.ModelConfig`'s, taken as keyword arguments: ModelConfig is
    their one declaration (type, default, help text), and ``__init__``'s signature is built from it below, so
    LightningCLI keeps flat keys (``--model.d_model``) and shows each field's documentation in ``--help``.

    Args:
        max_lr: Peak learning rate (reached after warm-up).
        min_lr: Final learning rate of the cosine schedule.
        warmup_steps: Linear warm-up length in optimizer steps.
        cosine_steps: Absolute optimizer step at which the cosine reaches ``min_lr``; ``None`` uses the Trainer's
            total number of optimizer steps (``max_steps``).
        betas: AdamW betas.
        eps: AdamW epsilon.
        weight_decay: AdamW decoupled weight decay for matrices.
        decay_norm_and_embeddings: Also decay RMSNorm gains and the token embedding (CS336 decays everything; the
            common LLM practice, and our default, is not to).
        compile: Wrap the model in ``torch.compile`` at fit start.
    """

    def __init__(
        self,
        max_lr: float = 1e-3,
        min_lr: float = 1e-4,
        warmup_steps: int = 100,
        cosine_steps: int | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        decay_norm_and_embeddings: bool = False,
        compile: bool = False,
        **model_config: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(model_config) - _MODEL_FIELDS)
        if unknown:
            raise ValueError(f"unknown LanguageModel argument(s) {unknown}; model fields: {sorted(_MODEL_FIELDS)}")
        self.config = ModelConfig(**model_config)
        hparams = {
            **self.config.to_dict(),
            "max_lr": max_lr,
            "min_lr": min_lr,
            "warmup_steps": warmup_steps,
            "cosine_steps": cosine_steps,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "decay_norm_and_embeddings": decay_norm_and_embeddings,
            "compile": compile,
        }
        if _given_hyperparameters.get() is not None:
            self.save_hyperparameters()  # under LightningCLI: its (flat) config of this class, and its instantiator
        else:
            # What save_hyperparameters() stores (lightning 2.6.6 utilities/parsing.py), set directly: its frame
            # inspection would look for the generated signature's model fields among this frame's locals.
            self._set_hparams(hparams)
            self._hparams_initial = copy.deepcopy(self._hparams)
        if not 0 <= min_lr <= max_lr:
            raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if cosine_steps is not None and cosine_steps < warmup_steps:
            raise ValueError(f"cosine_steps ({cosine_steps}) must be >= warmup_steps ({warmup_steps})")
        self.model = TransformerLM(self.config)
        self.tokenizer: Any | None = None  # set from the datamodule in setup(), or from a checkpoint
        self.val_loss = MeanMetric()
        self.val_ppl = Perplexity()

    # ----------------------------------------------------------------------------------------- hooks for callbacks
    @property
    def flops_per_token(self) -> float:
        """Training FLOPs (forward + backward) per token at full context, for MFU."""
        return float(self.model.flops_per_token(self.config.context_length))

    def generate(
        self,
        prompt_ids: torch.Tensor | list[list[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> list[list[int]]:
        """Sample continuations (new token ids per row); see :meth:`TransformerLM.generate`."""
        if eos_id is None and self.tokenizer is not None:
            eos_id = self.tokenizer.eot_id
        return self.model.generate(
            prompt_ids, max_new_tokens, temperature=temperature, top_p=top_p, eos_id=eos_id, generator=generator
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with the run's tokenizer."""
        return self._require_tokenizer().encode(text)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` with the run's tokenizer."""
        return self._require_tokenizer().decode(ids)

    def generate_text(self, prompt: str, max_new_tokens: int = 64, **kwargs: Any) -> str:
        """Prompt in, continuation out (text), using the run's tokenizer."""
        ids = self.encode(prompt)
        return self.decode(self.generate([ids], max_new_tokens, **kwargs)[0])

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise RuntimeError(
                "this model has no tokenizer attached: train it with a TokenDataModule, or load a checkpoint "
                "written by `cs336 fit` (it embeds the tokenizer)"
            )
        return self.tokenizer

    # -------------------------------------------------------------------------------------------------- training
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)  # (B, T, V)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_vocab = getattr(datamodule, "vocab_size", None)
        if data_vocab is not None and data_vocab != self.config.vocab_size:
            raise ValueError(
                f"vocabulary mismatch: the data has vocab_size={data_vocab} but the model has "
                f"vocab_size={self.config.vocab_size}; use data prepared with the model's tokenizer, or a model "
                f"with vocab_size={data_vocab}"
            )
        data_ctx = getattr(datamodule, "context_length", None)
        if data_ctx is not None and data_ctx > self.config.context_length:
            raise ValueError(
                f"context mismatch: the data's windows have context_length={data_ctx} but the model handles at most "
                f"{self.config.context_length}; set data.context_length <= model.context_length"
            )
        if self.tokenizer is None and datamodule is not None:
            self.tokenizer = getattr(datamodule, "tokenizer", None)
        if self.hparams.compile and stage == "fit" and not isinstance(self.model, torch._dynamo.OptimizedModule):
            self.model = torch.compile(self.model)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch  # (B, T), (B, T)
        logits = self(x)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        return loss, logits

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        # Re-create the metric states in this loop's grad mode: states left by a `trainer.validate()` run (inference
        # mode) cannot be updated in place by fit's validation loop.
        self.val_loss.reset()
        self.val_ppl.reset()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, logits = self._loss(batch)
        self.val_loss.update(loss, weight=batch[1].numel())
        self.val_ppl.update(logits.float(), batch[1])
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/ppl", self.val_ppl)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, _ = self._loss(batch)
        self.log("test/loss", loss)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = dict(self.model.named_parameters())
        decay_names, no_decay_names = _decay_split(self.model, hp.decay_norm_and_embeddings)
        decay = [params[n] for n in decay_names]
        no_decay = [params[n] for n in no_decay_names]
        # Named groups: LearningRateMonitor logs them as `lr-AdamW/decay` and `lr-AdamW/no_decay`.
        groups = [{"params": decay, "weight_decay": hp.weight_decay, "name": "decay"}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
        optimizer = torch.optim.AdamW(groups, lr=hp.max_lr, betas=tuple(hp.betas), eps=hp.eps)
        cosine_steps = hp.cosine_steps
        if cosine_steps is None:
            cosine_steps = int(self.trainer.estimated_stepping_batches)
        warmup = min(hp.warmup_steps, cosine_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cosine_lr(step, hp.max_lr, hp.min_lr, warmup, cosine_steps) / hp.max_lr
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A resumed run draws the same random numbers (sampling, dropout if added) as an uninterrupted one would:
        # Lightning restores the loops, optimizer, scheduler and callbacks, but not the RNGs.
        checkpoint["rng_states"] = _rng_states()
        # Self-contained checkpoints: `cs336 generate --ckpt` needs no data directory.
        if self.tokenizer is not None and hasattr(self.tokenizer, "to_str"):
            checkpoint["tokenizer"] = self.tokenizer.to_str()
        # A compiled model stores its weights under `model._orig_mod.`; keep the plain names.
        checkpoint["state_dict"] = {k.replace("._orig_mod.", "."): v for k, v in checkpoint["state_dict"].items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint and self._trainer is not None and self.trainer.state.fn == "fit":
            _set_rng_states(checkpoint["rng_states"])
        if "tokenizer" in checkpoint and self.tokenizer is None:
            from lightning_cs336.data import Tokenizer

            self.tokenizer = Tokenizer.from_str(checkpoint["tokenizer"])
        # Checkpoints hold plain names (see on_save_checkpoint); a model compiled in setup() expects `_orig_mod.`.
        if isinstance(self.model, torch._dynamo.OptimizedModule) and "state_dict" in checkpoint:
            checkpoint["state_dict"] = {
                (k.replace("model.", "model._orig_mod.", 1) if k.startswith("model.") else k): v
                for k, v in checkpoint["state_dict"].items()
            }
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        for key, value in checkpoint.get("state_dict", {}).items():
            if key in expected and tuple(value.shape) != expected[key]:
                raise ValueError(
                    f"checkpoint has {key} {tuple(value.shape)} but the model expects {expected[key]}: the checkpoint "
                    "is from a different architecture; pass the model config it was trained with"
                )


def _rng_states() -> dict[str, Any]:
    """torch, CUDA, numpy and Python RNG states in types ``torch.load(weights_only=True)`` accepts (Lightning's own
    ``_collect_rng_states`` keeps numpy's state as an ndarray, which a weights-only load refuses)."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np

    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        kind, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))


def _decay_split(model: torch.nn.Module, decay_all: bool) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters that get weight decay, and of those that do not, in model order."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Gains and embeddings are not decayed by default: decaying them pulls norms/embeddings toward zero.
        is_matrix = param.ndim >= 2 and "token_embeddings" not in name
        (decay if is_matrix or decay_all else no_decay).append(name)
    return decay, no_decay

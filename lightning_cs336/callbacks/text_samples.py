r"""
Text Sample Logger
==================

Generate text from fixed prompts every N steps and at the end of training, and keep the whole history of samples
in one table, so the model's progress can be read off as text next to its loss curve.

"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from lightning_cs336.callbacks._base import TelemetryCallback, check_positive_int
from lightning_cs336.callbacks._sinks import log_table

__all__ = ["TextSampleLogger"]

# Keys under which a batch dict most commonly holds its token ids.
_TOKEN_KEYS = ("input_ids", "tokens", "x", "idx", "inputs", "input")


class TextSampleLogger(TelemetryCallback):
    r"""Sample continuations of fixed prompts during training and log them as a growing table.

    Every ``log_every_n_steps`` optimizer steps, and once more when training ends, the module generates
    ``max_new_tokens`` tokens for each prompt with a ``torch.Generator`` seeded with ``seed`` on the module's device,
    re-seeded identically at every call: with identical weights the samples are identical, so the differences
    between two calls come from training alone. The prompts are ``prompts`` when given; otherwise the first
    ``prompt_tokens`` tokens of the first ``num_val_prompts`` held-out validation windows (taken once from
    ``trainer.val_dataloaders``, ``trainer.datamodule.val_dataloader()`` or ``pl_module.val_dataloader()``,
    decoded for the ``prompt`` column, and kept in the checkpoint so a resumed run samples the same windows; under
    a distributed sampler these are rank zero's first windows).

    Generation runs in eval mode under ``torch.no_grad()``; the train/eval mode of every submodule is restored
    exactly afterwards, and the global RNG state is forked so sampling never changes the training run's randomness.

    Module hooks it needs (duck-typed; when missing it warns once and does nothing, training continues):

    - ``pl_module.generate(prompt_ids, max_new_tokens, temperature=, top_p=, eos_id=, generator=)`` returning the
      new token ids per row as ``list[list[int]]``. ``prompt_ids`` is a ``LongTensor`` ``(B, T)`` on the module's
      device when all prompts have the same length, else a list of token-id lists.
    - ``pl_module.tokenizer`` with ``encode(str) -> list[int]`` and ``decode(list[int]) -> str``, and optionally
      ``eot_id`` (passed as ``eos_id``: generation of a row stops there).

    On W&B the table ``samples/generations`` is re-logged in full at every call, because W&B tables cannot be
    appended to (wandb #2768, #6341): the latest logged table holds every row so far, one row set per call,
    tagged with its ``step``. (wandb 0.31's ``Table(log_mode="INCREMENTAL")`` does work offline, but each logged
    file then holds only the new rows and an increment chain does not survive a resume, so it is not used.)
    TensorBoard gets the new rows of each call as a markdown text summary, any other logger (CSV, ...) the new rows
    as JSON lines in ``<log_dir>/samples_generations.jsonl``. The rows survive a checkpoint resume.

    Distributed: ``generate`` runs on EVERY rank, with the same prompts (broadcast from rank zero once) and the same
    seed, and only rank zero logs. That costs nothing extra under DDP (rank zero alone would make the others wait at
    the next collective anyway) and is required under FSDP, whose forward all-gathers parameters across ranks. Under
    FSDP, ``generate`` must then run the same number of forward passes on every rank: it does as long as the sampled
    tokens agree across ranks (same weights, prompts and generator), so keep ``generate`` deterministic given its
    ``generator``.

    Logged keys (``prefix`` prepended to each):

    ========================== ========= =====================================================================
    key                        unit      when
    ========================== ========= =====================================================================
    ``samples/generations``    table     every ``log_every_n_steps`` steps and at the end of training (columns:
                                         step, prompt, generation, temperature, top_p, max_tokens,
                                         tokens_per_sec)
    ``samples/generation_sec`` s         with each table: wall time of the ``generate`` call
    ``samples/tokens_per_sec`` tokens/s  with each table: new tokens generated / ``generation_sec``
    ========================== ========= =====================================================================

    The ``step`` column and the logging step are the number of optimizer steps the sampled weights have taken,
    which is also the logging step at which Lightning records ``train/loss`` measured with those same weights.

    Args:
        log_every_n_steps: Sample every this many optimizer steps; ``0`` samples only at the end of training,
            ``None`` follows ``Trainer(log_every_n_steps=...)`` (usually far too often for sampling).
        prompts: Prompt strings to continue. ``None`` takes prompts from the validation data.
        num_val_prompts: How many validation windows to use as prompts when ``prompts`` is ``None``.
        prompt_tokens: How many leading tokens of each validation window form its prompt.
        max_new_tokens: The most new tokens to generate per prompt.
        temperature: Sampling temperature; ``0`` asks ``generate`` for greedy decoding.
        top_p: Nucleus sampling mass in ``(0, 1]``; ``1.0`` disables it.
        seed: Seed of the generator, re-seeded identically at every call.
        sample_at_end: Also sample when training ends (unless the last periodic call was at that same step).
        prefix: Prepended to every logged key.
        **deprecated: ``every_n_steps`` (the old name of ``log_every_n_steps``; its ``None`` meant ``0``).

    Raises:
        ValueError: If an argument is out of range or of the wrong type.

    Example::

        from lightning.pytorch import Trainer
        from lightning_cs336.callbacks.text_samples import TextSampleLogger

        samples = TextSampleLogger(log_every_n_steps=500, prompts=["Once upon a time"], max_new_tokens=64)
        trainer = Trainer(callbacks=[samples])

    In a LightningCLI config::

        trainer:
          callbacks:
            - class_path: lightning_cs336.callbacks.text_samples.TextSampleLogger
              init_args:
                log_every_n_steps: 500
                prompts: ["Once upon a time", "The capital of France is"]
                max_new_tokens: 64
                temperature: 0.8
                top_p: 0.95
    """

    METRIC_KEYS: tuple[str, ...] = ("samples/generations", "samples/generation_sec", "samples/tokens_per_sec")
    COLUMNS: tuple[str, ...] = ("step", "prompt", "generation", "temperature", "top_p", "max_tokens", "tokens_per_sec")

    _ALLOWS_ZERO_INTERVAL = True

    def __init__(
        self,
        log_every_n_steps: int | None = 500,
        prompts: list[str] | None = None,
        num_val_prompts: int = 4,
        prompt_tokens: int = 32,
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        top_p: float = 0.95,
        seed: int = 1234,
        sample_at_end: bool = True,
        prefix: str = "",
        **deprecated: Any,
    ) -> None:
        if "every_n_steps" in deprecated:
            log_every_n_steps = self._deprecated_interval(deprecated.pop("every_n_steps"), none_means=0)
        if deprecated:
            raise TypeError(f"TextSampleLogger got unexpected keyword arguments {sorted(deprecated)}")
        super().__init__(log_every_n_steps=log_every_n_steps, prefix=prefix)
        if prompts is not None:
            if isinstance(prompts, str) or not isinstance(prompts, Sequence):
                raise ValueError(f"prompts must be a list of strings or None, got {prompts!r}")
            if not prompts or not all(isinstance(p, str) and p for p in prompts):
                raise ValueError(f"prompts must be a non-empty list of non-empty strings, got {prompts!r}")
        for name, value in (
            ("num_val_prompts", num_val_prompts),
            ("prompt_tokens", prompt_tokens),
            ("max_new_tokens", max_new_tokens),
        ):
            check_positive_int(name, value)
        if not _is_number(temperature) or not temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        if not _is_number(top_p) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if not isinstance(sample_at_end, bool):
            raise ValueError(f"sample_at_end must be a bool, got {sample_at_end!r}")
        self.prompts = list(prompts) if prompts is not None else None
        self.num_val_prompts = num_val_prompts
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.seed = seed
        self.sample_at_end = sample_at_end

        self._rows: list[list[Any]] = []
        self._last_step: int | None = None
        # Validation-window prompts, fixed at the first call and checkpointed so a resume samples the same windows.
        self._val_prompt_ids: list[list[int]] | None = None
        self._enabled = True

    @property
    def rows(self) -> list[list[Any]]:
        """Every row logged so far (all calls, oldest first), in :attr:`COLUMNS` order."""
        return self._rows

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Checked here, not in setup(): callbacks' setup runs before the LightningModule's, and a module may attach
        # its tokenizer in its own setup() (e.g. from the datamodule).
        missing = _missing_hooks(pl_module)
        self._enabled = not missing
        if missing:
            self.warn_once(
                "missing-hooks",
                f"the LightningModule has no {' and no '.join(missing)}, so no text samples are generated or logged. "
                "Give it `generate(prompt_ids, max_new_tokens, temperature=, top_p=, eos_id=, generator=)` "
                "and a `tokenizer` with `encode`/`decode`.",
            )

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.is_logging_step(trainer):
            # The weights have now taken this batch's optimizer step, which Lightning counts only after this hook.
            self._sample(trainer, pl_module, self.step(trainer) + 1)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # on_train_end, not on_fit_end: by on_fit_end the strategy has torn down (the model may be back on the CPU)
        # and the loggers are about to be finalized. Every logger is still open here.
        step = self.step(trainer)
        if self.sample_at_end and step != self._last_step:
            self._sample(trainer, pl_module, step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "rows": [list(row) for row in self._rows],
            "last_step": self._last_step,
            "val_prompt_ids": self._val_prompt_ids,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Tolerate checkpoints written by older versions (or with no state for this callback).
        self._rows = [list(row) for row in state_dict.get("rows", [])]
        self._last_step = state_dict.get("last_step")
        ids = state_dict.get("val_prompt_ids")
        self._val_prompt_ids = [list(map(int, row)) for row in ids] if ids else None

    def _sample(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        """Generate for every prompt, remember the rows and log them (rank zero). Runs on every rank."""
        # The same on every rank (loggers and hooks do not differ by rank), so all ranks take the same branch.
        if not self._enabled or not trainer.loggers:
            return
        tokenizer = pl_module.tokenizer
        try:
            prompts = self._prompts(trainer, pl_module, tokenizer)
        except Exception as err:  # e.g. a tokenizer whose encode() fails: never end the training run for it
            self.warn_once("prompts-failed", f"building the prompts failed ({type(err).__name__}: {err}).")
            return
        if not prompts:
            return
        ids = [row for row, _ in prompts]
        device = pl_module.device
        if len({len(row) for row in ids}) == 1:
            prompt_arg: torch.Tensor | list[list[int]] = torch.tensor(ids, dtype=torch.long, device=device)
        else:
            prompt_arg = ids
        generator = torch.Generator(device=device).manual_seed(self.seed)

        modes = [(module, module.training) for module in pl_module.modules()]
        pl_module.eval()
        start = time.perf_counter()
        try:
            with torch.no_grad(), _fork_rng(device):
                new_ids = pl_module.generate(
                    prompt_arg,
                    self.max_new_tokens,
                    temperature=self.temperature,
                    top_p=self.top_p,
                    eos_id=getattr(tokenizer, "eot_id", None),
                    generator=generator,
                )
            elapsed = time.perf_counter() - start
            new_ids = [_as_ids(row) for row in (new_ids.tolist() if isinstance(new_ids, torch.Tensor) else new_ids)]
            texts = [str(tokenizer.decode(row)) for row in new_ids]
        except Exception as err:  # a telemetry callback must not end a training run
            self.warn_once("generate-failed", f"text generation failed at step {step} ({type(err).__name__}: {err}).")
            return
        finally:
            # Restore exactly the previous modes: train() through the module's own method (it may override it),
            # then any submodule that was in a different mode than its parent (e.g. a frozen, eval-mode part).
            pl_module.train(modes[0][1])
            for module, mode in modes:
                if module.training != mode:
                    module.training = mode

        num_tokens = sum(len(row) for row in new_ids)
        tokens_per_sec = num_tokens / elapsed if elapsed > 0 else 0.0
        new_rows = [
            [step, prompt_text, text, self.temperature, self.top_p, self.max_new_tokens, round(tokens_per_sec, 2)]
            for (_, prompt_text), text in zip(prompts, texts, strict=False)
        ]
        self._rows.extend(new_rows)
        self._last_step = step
        key = self.prefix + "samples/generations"
        # W&B gets every row so far (its tables cannot be appended to); the other loggers get only the new rows.
        log_table(trainer, key, self.COLUMNS, new_rows, step=step, all_rows=self._rows)
        self.log_metrics(
            trainer, {"samples/generation_sec": elapsed, "samples/tokens_per_sec": tokens_per_sec}, step=step
        )

    def _prompts(self, trainer: Trainer, pl_module: LightningModule, tokenizer: Any) -> list[tuple[list[int], str]]:
        """The ``(token ids, text)`` of each prompt: configured strings, else validation windows."""
        if self.prompts is not None:
            out = []
            eot = getattr(tokenizer, "eot_id", None)
            for text in self.prompts:
                ids = _as_ids(tokenizer.encode(text))
                if not ids and eot is not None:
                    ids = [int(eot)]
                if ids:
                    out.append((ids, text))
            if not out:
                self.warn_once("empty-prompts", "every prompt encodes to no tokens; nothing to sample from.")
            return out

        if self._val_prompt_ids is None:
            # Only rank zero reads the data; the others receive its windows, so every rank generates from the same
            # prompts (required under FSDP, where each forward is a collective).
            ids = self._val_windows(trainer, pl_module) if trainer.is_global_zero else None
            if trainer.world_size > 1:
                ids = trainer.strategy.broadcast(ids, src=0)
            if not ids:
                self._enabled = False
                self.warn_once(
                    "no-prompts",
                    "no `prompts` were given and no validation batch with token ids was found "
                    "(trainer.val_dataloaders, trainer.datamodule.val_dataloader(), pl_module.val_dataloader()); "
                    "no text samples are logged.",
                )
                return []
            self._val_prompt_ids = ids
        return [(row, str(tokenizer.decode(row))) for row in self._val_prompt_ids]

    def _val_windows(self, trainer: Trainer, pl_module: LightningModule) -> list[list[int]] | None:
        """The first ``prompt_tokens`` tokens of the first ``num_val_prompts`` validation windows, or None."""
        # Callables, so that a later source is only built when the earlier ones had nothing.
        sources: list[Callable[[], Any]] = [lambda: trainer.val_dataloaders]  # set once validation has run
        if trainer.datamodule is not None:
            sources.append(lambda: trainer.datamodule.val_dataloader())
        sources.append(lambda: pl_module.val_dataloader())
        for source in sources:
            rows: list[list[int]] = []
            try:
                loader = _first_loader(source())
                for batch in loader if loader is not None else ():
                    for row in _token_rows(batch):
                        rows.append(row[: self.prompt_tokens])
                        if len(rows) == self.num_val_prompts:
                            return rows
                    if not rows:  # the batches hold no token ids: no point reading further
                        break
            except Exception:  # e.g. the default LightningModule.val_dataloader raises when not implemented
                pass
            if rows:
                return rows
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _missing_hooks(pl_module: LightningModule) -> list[str]:
    missing = []
    if not callable(getattr(pl_module, "generate", None)):
        missing.append("`generate(...)` method")
    tokenizer = getattr(pl_module, "tokenizer", None)
    if not (callable(getattr(tokenizer, "encode", None)) and callable(getattr(tokenizer, "decode", None))):
        missing.append("`tokenizer` with `encode`/`decode`")
    return missing


def _as_ids(value: Any) -> list[int]:
    """Token ids as a list of ints, from a list, a tensor, or an encoding object with ``.ids`` (HF tokenizers)."""
    if hasattr(value, "ids") and not isinstance(value, (list, tuple)):
        value = value.ids
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1).tolist()
    return [int(v) for v in value]


def _first_loader(loaders: Any) -> Any:
    """The first dataloader of what ``val_dataloaders`` may hold: a loader, a list/tuple or a dict of them."""
    if isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    elif isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    return loaders


def _token_rows(batch: Any) -> Iterator[list[int]]:
    """The token-id rows of a batch: an integer tensor, or the first one inside a tuple/list/dict batch."""
    tensor = _find_token_tensor(batch)
    if tensor is None:
        return
    tensor = tensor.detach().cpu()
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    for row in tensor.reshape(tensor.shape[0], -1).tolist():
        if row:
            yield row


def _find_token_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        is_ids = not batch.is_floating_point() and not batch.is_complex() and batch.dtype != torch.bool
        return batch if is_ids and batch.ndim in (1, 2) else None
    if isinstance(batch, dict):
        for key in _TOKEN_KEYS:
            if key in batch and (found := _find_token_tensor(batch[key])) is not None:
                return found
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if (found := _find_token_tensor(item)) is not None:
                return found
    return None


@contextlib.contextmanager
def _fork_rng(device: torch.device) -> Iterator[None]:
    """Save and restore the global RNG state (CPU, and the module's CUDA device) around generation, so a ``generate``
    that draws from the global RNG does not change the training run's randomness."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=devices):
        yield

"""The suite's promise "no host-device synchronisation on steps that do not log", checked on every commit on CPU.

The whole suite (every callback class exported by ``lightning_cs336.callbacks.__all__``, so callbacks added later are
covered without editing this file, plus Lightning's ``LearningRateMonitor``) trains the real ``LanguageModel`` (which
logs ``train/loss`` itself) on real prepared data with real loggers, while a :class:`HostReadCounter` counts every
host read of a tensor from the first ``on_train_batch_start`` hook to the module's ``on_train_batch_end`` (which
Lightning calls after every callback's): the forward and backward passes, ``self.log``, gradient clipping, the
optimizer and scheduler steps, and every callback hook. Steps that do not log must show zero reads.

**What counts as a host read.** CPU tensors cannot be told apart from "device" tensors by their device, so the
counter counts what *would* synchronise a CUDA device if the same code ran there:

- ``aten._local_scalar_dense``, the single op behind ``Tensor.item()``, ``float()``, ``int()``, ``bool()``,
  ``__index__`` and ``__format__`` of a tensor, seen at the dispatcher, so reads from C++ or library code count too;
- ``Tensor.tolist()``, ``.numpy()``, ``__array__`` (``np.asarray``), ``.cpu()`` and ``.to(<cpu device>)``.

``.to(<cpu>)`` counts only when the call names the host literally (``.to("cpu")``, ``.to(torch.device("cpu"))``):
``.to(p.device)`` or ``.to(trainer.strategy.root_device)`` (the batch transfer, the clipping's and the gradient-norm
pass's gathering of per-tensor norms) also land on the CPU here, but stay on the device in a CUDA run.

Excluded, because they live on the host in a CUDA run as well and reading them never synchronises: the optimizer's
``state["step"]`` counters (torch keeps them on the CPU unless ``capturable``/``fused``, and AdamW reads each of
them every step). The progress bar is off: it reads the logged loss at each refresh by design
(``configs/tinystories-17m.yaml`` sets its refresh rate to the logging interval).

The negative control shows the counter is not blind: a callback that does one read of each kind per step is caught,
every kind on every non-logging step.
"""

from __future__ import annotations

import inspect
import linecache
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_cs336.callbacks as suite
from lightning_cs336.callbacks import StepClock
from lightning_cs336.data import TokenDataModule
from lightning_cs336.module import LanguageModel
from lightning_cs336.record import RunRecord

LOG_EVERY = 4
MAX_STEPS = 17  # 17 steps: logging steps 3, 7, 11, 15 and the last; 12 steps that must not read anything

# Constructor arguments for callbacks whose defaults would do nothing periodic in a 17-step run. Anything else is
# built with `log_every_n_steps=LOG_EVERY` when it takes that argument, else with no arguments: a callback added to
# `__all__` later is covered as it is by default (and a new required argument shows up here as a TypeError).
_KWARGS: dict[str, dict[str, Any]] = {
    "TextSampleLogger": {"prompts": ["def "], "max_new_tokens": 4},
}

# Host-side Tensor methods that copy a tensor's values to Python/NumPy (item/float/int/bool are caught below them,
# at the dispatcher).
_HOST_METHODS = {
    torch.Tensor.tolist: "tolist",
    torch.Tensor.numpy: "numpy",
    torch.Tensor.__array__: "__array__",
    torch.Tensor.cpu: "cpu",
}
_SCALAR_READ = torch.ops.aten._local_scalar_dense.default
_HERE = Path(__file__).resolve()
_PACKAGE = Path(suite.__file__).resolve().parents[1]


def _suite_callbacks() -> list[Callback]:
    out: list[Callback] = [LearningRateMonitor(logging_interval="step")]
    for name in suite.__all__:
        cls = getattr(suite, name)
        if not (inspect.isclass(cls) and issubclass(cls, Callback)) or inspect.isabstract(cls):
            continue
        if cls is suite.TelemetryCallback:
            continue
        kwargs = dict(_KWARGS.get(name, {}))
        if "log_every_n_steps" in inspect.signature(cls).parameters and name != "RunInfoLogger":
            kwargs.setdefault("log_every_n_steps", LOG_EVERY)
        out.append(cls(**kwargs))
    return out


def _to_host(args: tuple, kwargs: dict) -> bool:
    """Whether a ``Tensor.to(...)`` call names the host: its target is the CPU *and* the call says so literally
    (``.to("cpu")``, ``.to(device="cpu")``, ``.to(torch.device("cpu"))``). On this CPU-only run ``.to(p.device)``
    or ``.to(trainer.strategy.root_device)`` also target the CPU, but in a CUDA run they stay on the device (a
    no-op or a host-to-device copy of the batch), so they are not host reads."""
    for value in (*args[1:], kwargs.get("device")):
        if isinstance(value, (str, torch.device)):
            try:
                if torch.device(value).type != "cpu":
                    return False
            except (RuntimeError, TypeError):
                continue
            if isinstance(value, str):
                return True
            caller = _caller()
            return caller is not None and "cpu" in (linecache.getline(caller.filename, caller.lineno) or "")
    return False


def _caller() -> traceback.FrameSummary | None:
    """The innermost frame outside torch and outside this counter."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename
        if "/torch/" in path or (path == __file__ and frame.name in _COUNTER_FRAMES):
            continue
        return frame
    return None


_COUNTER_FRAMES = frozenset(
    {"__torch_function__", "__torch_dispatch__", "record", "_to_host", "_caller", "_origin", "excluded"}
)


def _origin() -> str:
    """Where a read came from: the innermost caller outside torch (this package, a test, or Lightning)."""
    frame = _caller()
    if frame is None:
        return "<unknown>"
    path = frame.filename
    short = path.split("/site-packages/")[-1] if "site-packages" in path else path.replace(str(_PACKAGE) + "/", "")
    return f"{short}:{frame.lineno} ({frame.name})"


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: HostReadCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _SCALAR_READ and args and not self.counter.excluded(args[0]):
            self.counter.record("scalar (item/float/int/bool)")
        return func(*args, **(kwargs or {}))


class HostReadCounter(TorchFunctionMode):
    """Counts host reads of tensors while active (see the module docstring); ``excluded`` tensors are not counted.

    Use as a context manager, or ``start()``/``stop()`` from different hooks.
    """

    def __init__(self, host_tensors: Callable[[], Iterable[torch.Tensor]] = tuple) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()
        self.where: list[str] = []
        self._excluded: set[int] = set()
        self._host_tensors = host_tensors
        self._dispatch = _Dispatch(self)

    def exclude(self, tensors: Iterable[Any]) -> None:
        """Never count reads of these tensors (host data in a CUDA run too)."""
        self._excluded.update(id(t) for t in tensors if isinstance(t, torch.Tensor))

    def excluded(self, tensor: Any) -> bool:
        # host_tensors() is asked at the read itself: the optimizer creates its step counters inside its first step.
        return id(tensor) in self._excluded or any(t is tensor for t in self._host_tensors())

    def record(self, kind: str) -> None:
        self.reads[kind] += 1
        self.where.append(f"{kind} at {_origin()}")

    def start(self) -> None:
        self.__enter__()
        self._dispatch.__enter__()

    def stop(self) -> None:
        self._dispatch.__exit__(None, None, None)
        self.__exit__(None, None, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _HOST_METHODS.get(func)
        if kind is None and func is torch.Tensor.to and _to_host(args, kwargs):
            kind = "to(cpu)"
        if kind is not None and args and not self.excluded(args[0]):
            self.record(kind)
        return func(*args, **kwargs)


class _OpenWindow(Callback):
    """First callback: opens the counting window of each training step and classifies the step."""

    def __init__(self, counter: HostReadCounter) -> None:
        self.counter = counter
        self.clock = StepClock(None)  # the Trainer's interval, Lightning's rule
        self.per_step: list[tuple[int, bool, Counter[str], list[str]]] = []
        self.logging = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.counter.reads, self.counter.where = Counter(), []
        # A checkpoint save also stops the window's device work; ModelCheckpoint below saves on logging steps only.
        self.logging = self.clock.is_logging_step(trainer)
        self.step = StepClock.step(trainer)
        self.counter.start()


class WindowedLM(LanguageModel):
    """The real LanguageModel; its on_train_batch_end (which Lightning runs after every callback's) closes the
    window."""

    window: _OpenWindow

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        w = self.window
        w.counter.stop()
        w.per_step.append((w.step, w.logging, w.counter.reads, w.counter.where))


class PerStepReads(Callback):
    """The negative control: one host read of each kind on every step (what a careless callback would do)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach()
        grad = pl_module.model.lm_head.weight
        _ = loss.item()
        _ = float(loss)
        _ = bool(loss > 0)
        _ = loss.tolist()
        _ = grad.detach().cpu()
        _ = grad.detach().to("cpu")
        _ = loss.numpy()


def _optimizer_steps(trainer: L.Trainer) -> Iterable[torch.Tensor]:
    """The optimizers' ``state["step"]`` counters: host tensors in a CUDA run too (module docstring)."""
    for optimizer in trainer.optimizers:
        for state in optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                yield state["step"]


def _fit(
    tmp_path: Path, data_dir: Path, extra: list[Callback], max_steps: int = MAX_STEPS, wandb: bool = True
) -> _OpenWindow:
    trainer: L.Trainer | None = None
    counter = HostReadCounter(lambda: _optimizer_steps(trainer) if trainer is not None else ())
    window = _OpenWindow(counter)
    model = WindowedLM(
        vocab_size=257, context_length=32, d_model=32, num_layers=2, num_heads=2, d_ff=64, warmup_steps=2
    )
    model.window = window
    data = TokenDataModule(data_dir=str(data_dir), context_length=32, batch_size=4, val_windows=8)
    trainer = L.Trainer(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        log_every_n_steps=LOG_EVERY,
        val_check_interval=6,  # validation lands between steps of both kinds
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        logger=[RunRecord(tmp_path, name="sync")]
        + ([WandbLogger(save_dir=str(tmp_path), project="sync")] if wandb else []),
        callbacks=[
            window,
            *_suite_callbacks(),
            *extra,
            ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=LOG_EVERY, save_last=True),
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    assert len(window.per_step) == max_steps
    return window


def test_whole_suite_makes_no_host_read_on_steps_that_do_not_log(tmp_path: Path, tiny_data: Path) -> None:
    window = _fit(tmp_path, tiny_data, [])
    quiet = [(step, reads, where) for step, logging, reads, where in window.per_step if not logging]
    logging = [reads for _, is_log, reads, _ in window.per_step if is_log]
    assert len(quiet) == MAX_STEPS - len(logging) >= 12
    offenders = [f"step {step}: {', '.join(where)}" for step, reads, where in quiet if reads]
    assert not offenders, "host reads on steps that do not log:\n" + "\n".join(offenders)
    # The window is real: logging steps (values cross to the host, checkpoints are saved) do read.
    assert all(sum(reads.values()) > 0 for reads in logging)


def test_negative_control_a_per_step_read_is_caught(tmp_path: Path, tiny_data: Path) -> None:
    # The same suite, a shorter run, no W&B (the window and the counter are what is under test here).
    window = _fit(tmp_path, tiny_data, [PerStepReads()], max_steps=6, wandb=False)
    quiet = [(reads, where) for _, logging, reads, where in window.per_step if not logging]
    assert quiet
    for reads, where in quiet:
        # item, float and bool are three scalar reads; the others one each.
        assert reads["scalar (item/float/int/bool)"] >= 3
        for kind in ("tolist", "cpu", "to(cpu)", "numpy"):
            assert reads[kind] >= 1, (kind, reads)
        assert any("test_no_host_sync.py" in w and "on_train_batch_end" in w for w in where)


@pytest.mark.parametrize(
    "read",
    [lambda t: t.item(), lambda t: int(t), lambda t: t.tolist(), lambda t: t.to(torch.device("cpu"))],
    ids=["item", "int", "tolist", "to-cpu"],
)
def test_counter_counts_reads_and_respects_exclusions(read) -> None:
    counter = HostReadCounter()
    t, host = torch.ones(()) * 3, torch.ones(()) * 4
    counter.exclude([host])
    with counter, counter._dispatch:
        _ = t + 1  # computing is free
        read(t)
        read(host)
    assert sum(counter.reads.values()) == 1

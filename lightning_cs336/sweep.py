"""Hyperparameter search on Optuna (``cs336 sweep``): a search space in LightningCLI's dotted keys, each trial a real
``cs336 fit`` process, pruning at every validation keyed by the optimizer step, the study in a database.

How a trial runs. The driver (:func:`run_sweep`) asks the study for a trial (``study.ask`` with the space as Optuna
distributions), then launches ``python -m lightning_cs336 fit --config BASE --model.max_lr=... --trainer.callbacks+=
{OptunaPruning...}`` as its own process, named ``<study>.trial-<N>``, in the W&B group ``<study>`` with the tags
``sweep`` and ``trial-<N>`` (so the trial is an ordinary run in ``<root>/<project>/<name>/`` with the whole suite, and
``cs336 runs`` reads it). Its :class:`OptunaPruning` callback reports the metric at every validation with
``step=trainer.global_step`` (not the epoch: optuna-integration's callback reports once per epoch, optuna issue 2932,
and an LM run on a token stream has one endless epoch), asks ``trial.should_prune()`` on global rank zero and
broadcasts the answer, so every DDP rank stops at the same step. A pruned trial keeps its checkpoint (the config's
``ModelCheckpoint`` saves at that validation; without one the callback saves ``checkpoints/pruned.ckpt``) and is
marked pruned in its run record (tag ``pruned``, summary ``sweep/state: pruned``) and in W&B (tag and summary). When
the process ends the driver tells the study: complete (the metric's final value from the run record), pruned, or
failed (the run's error); a failed trial does not stop the study.

Where the study lives. By default ``sqlite:///<root>/<project>/sweeps/<study>.db`` next to the runs: a real SQLite
database, no server. Re-running the same command continues the study (``load_if_exists``). ``--storage`` takes any
Optuna URL (``postgresql://...``, ``mysql://...``) or ``journal:///path/study.log`` (Optuna's journal file, for
shared file systems), and several workers, on one machine or many, share one study: each asks, runs and tells
its own trials. ``trials`` is the study's total: a worker stops asking once the study holds that many trials
(complete, pruned, failed, or running elsewhere). For file storages (SQLite, journal) the count-and-ask step is done
under a file lock (``<file>.lock``, ``flock``), so concurrent workers never overshoot; for database servers a surplus
trial is told failed with the user attribute ``surplus`` and is not counted or reported.

Interruptions. SIGINT/SIGTERM to the driver stops its trials (SIGTERM to each ``cs336 fit``, which records it as
preempted); they are told failed and their parameters enqueued again, so the next run retries them first. A driver
killed outright (SIGKILL, power loss) takes its trial processes with it (``PR_SET_PDEATHSIG`` on Linux); its
``RUNNING`` trials are found by the next driver on the same host (the recorded driver pid is gone), or, with RDB
storage, by Optuna's heartbeat after its grace period, and retried the same way.

The end. Each driver writes ``<root>/<project>/sweeps/<study>.{json,md,html}`` (every trial: state, value,
parameters, run; the best trial; parameter importances from ``optuna.importance.get_param_importances`` once two
trials completed) and ``<study>.best.yaml``: the base config with the best parameters merged in, ready for
``cs336 fit --config``. The HTML report (:mod:`lightning_cs336.report`) shows the trials' curves and a
parallel-coordinates view of the parameters against the metric; ``cs336 runs report`` shows the same for any runs
that carry sweep parameters.

Example::

    from lightning_cs336.sweep import run_sweep

    result = run_sweep("configs/quickstart.yaml", "configs/sweeps/debug_space.yaml", trials=20, pruner="median")
    print(result.text, result.best)
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import Callback

from lightning_cs336 import ablate

__all__ = [
    "PRUNERS",
    "SAMPLERS",
    "OptunaPruning",
    "Param",
    "SweepResult",
    "default_storage",
    "load_space",
    "make_pruner",
    "make_sampler",
    "merge_params",
    "open_storage",
    "parse_space",
    "run_sweep",
    "wandb_sweep_config",
]

#: Samplers by name (``--sampler NAME[:key=value,...]``), with the Optuna class each stands for.
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler"}
#: Pruners by name (``--pruner NAME[:key=value,...]``).
PRUNERS = {
    "median": "MedianPruner",
    "successive-halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
    "threshold": "ThresholdPruner",
    "none": "NopPruner",
}
CALLBACK = "lightning_cs336.sweep.OptunaPruning"
PRUNED_ATTR = "pruned_at_step"
_TYPES = ("float", "int", "categorical")
_FIELDS = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"}, "categorical": {"choices"}}
# Arguments the sweep sets itself in every trial.
_OWN_ARGS = ("print_config", "config", "ckpt_path")
_THREAD_LOCK = threading.Lock()
_HEARTBEAT_S, _GRACE_S = 60, 180


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ValueError(
            "cs336 sweep needs Optuna: pip install 'lightning-cs336[sweep]' (or pip install optuna)"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


# --------------------------------------------------------------------------------------------------- the space


@dataclass(frozen=True)
class Param:
    """One dimension of the search space: a dotted ``cs336 fit`` key and its distribution."""

    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def distribution(self) -> Any:
        """The Optuna distribution."""
        d = _optuna().distributions
        if self.type == "float":
            return d.FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)
        if self.type == "int":
            return d.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return d.CategoricalDistribution(list(self.choices))

    def grid(self) -> list[Any]:
        """Every value, for the grid sampler (categoricals, and ints or floats with a ``step``)."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int" and not self.log:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.type == "float" and self.step is not None:
            n = int(round((self.high - self.low) / self.step))
            return [round(self.low + i * self.step, 12) for i in range(n + 1)]
        raise ValueError(
            f"the grid sampler needs every value of {self.key}: give it `step:` (or `choices:` for a categorical)"
        )

    def ends(self) -> tuple[Any, Any]:
        """Its two extreme values (what the up-front parse checks)."""
        if self.type == "categorical":
            return self.choices[0], self.choices[-1]
        if self.step is not None and not self.log:
            high = self.low + math.floor((self.high - self.low) / self.step + 1e-9) * self.step
            return self.low, type(self.low)(high) if self.type == "int" else high
        return self.low, self.high

    def to_dict(self) -> dict[str, Any]:
        if self.type == "categorical":
            return {"type": self.type, "choices": list(self.choices)}
        out = {"type": self.type, "low": self.low, "high": self.high, "log": self.log}
        return out | ({"step": self.step} if self.step is not None else {})


def _number(value: Any, kind: str, what: str) -> float | int:
    if isinstance(value, str) and ablate._FLOAT.match(value.strip()):
        value = float(value)  # PyYAML reads `1e-4` as a string (YAML 1.1)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a number, got {value!r}")
    if kind == "int":
        if float(value) != int(value):
            raise ValueError(f"{what} must be an integer for type int, got {value!r}")
        return int(value)
    return float(value)


def parse_space(data: Any, source: str = "the space") -> dict[str, Param]:
    """The search space from its mapping: ``{"model.max_lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log":
    true}, "model.num_layers": {"type": "int", "low": 2, "high": 8, "step": 2}, "model.d_ff": {"type":
    "categorical", "choices": [64, 128]}}``.

    Raises:
        ValueError: Naming the key and what is wrong: not a dotted key, a key the sweep sets itself, an unknown type
            or field, low >= high, a log range that is not positive, a step with log, an empty or repeated choice.
    """
    if not isinstance(data, Mapping) or not data:
        raise ValueError(f"{source} must be a mapping of dotted keys to distributions (e.g. model.max_lr: {{type: "
                         "float, low: 1.0e-4, high: 1.0e-2, log: true}})")  # fmt: skip
    space: dict[str, Param] = {}
    for key, spec in data.items():
        where = f"{source}: {key}"
        if not isinstance(key, str) or not ablate._KEY.match(key):
            raise ValueError(f"{source}: {key!r} is not a dotted config key (e.g. model.max_lr)")
        if any(key == r or key.startswith(r + ".") for r in (*ablate._RESERVED, "ckpt_path")):
            raise ValueError(f"{where}: the sweep sets {key} itself (its trials' names and directory)")
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}: expected a mapping like {{type: float, low: 1.0e-4, high: 1.0e-2}}")
        kind = spec.get("type")
        if kind not in _TYPES:
            raise ValueError(f"{where}: type must be one of {', '.join(_TYPES)}, got {kind!r}")
        unknown = sorted(set(spec) - _FIELDS[kind] - {"type"})
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown} for type {kind} (known: {sorted(_FIELDS[kind])})")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ValueError(f"{where}: choices must be a non-empty list")
            choices = [ablate.parse_value(c) if isinstance(c, str) else c for c in choices]
            if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
                raise ValueError(f"{where}: choices must be scalars (numbers, strings, booleans, null)")
            shown = [ablate.cli_value(c) for c in choices]
            if len(set(shown)) != len(shown):
                raise ValueError(f"{where}: a choice is given twice")
            space[key] = Param(key, kind, choices=tuple(choices))
            continue
        if "low" not in spec or "high" not in spec:
            raise ValueError(f"{where}: type {kind} needs low and high")
        low = _number(spec["low"], kind, f"{where}: low")
        high = _number(spec["high"], kind, f"{where}: high")
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise ValueError(f"{where}: log must be true or false, got {log!r}")
        step = spec.get("step")
        if step is not None:
            step = _number(step, kind, f"{where}: step")
            if step <= 0:
                raise ValueError(f"{where}: step must be positive, got {step}")
            if log:
                raise ValueError(f"{where}: step cannot be combined with log: true (Optuna samples one or the other)")
        if not low < high:
            raise ValueError(f"{where}: need low < high, got low={low} high={high}")
        if log and low <= 0:
            raise ValueError(f"{where}: log: true needs low > 0, got low={low}")
        space[key] = Param(key, kind, low=low, high=high, log=log, step=step)
    return space


def load_space(path: str | os.PathLike[str]) -> dict[str, Param]:
    """The search space from a YAML file (see :func:`parse_space`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"space file {path} does not exist: pass --space PATH to a YAML search space")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"space file {path} is not YAML: {str(err).splitlines()[0]}") from None
    return parse_space(data, f"space file {path}")


# --------------------------------------------------------------------------------------------------- samplers


def _spec(text: str, what: str, names: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    """``"median:n_startup_trials=2,n_warmup_steps=4"`` as ``("median", {...})``."""
    name, _, rest = text.partition(":")
    name = name.strip().lower()
    if name not in names:
        raise ValueError(f"--{what} {text!r}: unknown {what}; choose one of {', '.join(names)}")
    kwargs: dict[str, Any] = {}
    for part in ablate.split_values(rest) if rest.strip() else []:
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--{what} {text!r}: expected NAME:key=value,... (e.g. median:n_startup_trials=2)")
        kwargs[key.strip()] = ablate.parse_value(value)
    return name, kwargs


def _construct(cls: type, kwargs: Mapping[str, Any], what: str, text: str) -> Any:
    import inspect

    accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "search_space")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"--{what} {text!r}: {cls.__name__} takes no {unknown}; it takes {', '.join(accepted)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"--{what} {text!r}: {err}") from None


def make_sampler(text: str, space: Mapping[str, Param], seed: int | None = None) -> Any:
    """An Optuna sampler by name (:data:`SAMPLERS`), e.g. ``tpe``, ``random``, ``grid``, ``tpe:n_startup_trials=5``."""
    optuna = _optuna()
    name, kwargs = _spec(text, "sampler", SAMPLERS)
    if seed is not None:
        kwargs.setdefault("seed", seed)
    cls = getattr(optuna.samplers, SAMPLERS[name])
    if name == "grid":
        grid = {k: p.grid() for k, p in space.items()}
        return _grid(cls, grid, kwargs)
    return _construct(cls, kwargs, "sampler", text)


def _grid(cls: type, grid: dict[str, list[Any]], kwargs: dict[str, Any]) -> Any:
    unknown = sorted(set(kwargs) - {"seed"})
    if unknown:
        raise ValueError(f"--sampler grid: GridSampler takes no {unknown}; it takes seed")
    return cls(grid, **kwargs)


def make_pruner(text: str) -> Any:
    """An Optuna pruner by name (:data:`PRUNERS`): ``median``, ``successive-halving``, ``hyperband``, ``threshold``
    (``threshold:upper=8.0``: stop diverging runs), ``none``; options after a colon, e.g.
    ``successive-halving:min_resource=2,reduction_factor=2``. Steps are optimizer steps (what
    :class:`OptunaPruning` reports with)."""
    optuna = _optuna()
    name, kwargs = _spec(text, "pruner", PRUNERS)
    return _construct(getattr(optuna.pruners, PRUNERS[name]), kwargs, "pruner", text)


# --------------------------------------------------------------------------------------------------- storage


def default_storage(parent: str | os.PathLike[str], study: str) -> str:
    """``sqlite:///<parent>/sweeps/<study>.db``: the study next to its runs."""
    return f"sqlite:///{(Path(parent) / 'sweeps' / f'{study}.db').absolute()}"


def _journal_path(url: str) -> str | None:
    if url.startswith("journal://"):
        return url[len("journal://") :] or None
    return None


def _lock_path(url: str) -> Path | None:
    """The lock file of a file storage (SQLite, journal); None for database servers."""
    journal = _journal_path(url)
    if journal:
        return Path(journal + ".lock")
    if url.startswith("sqlite:///") and url[len("sqlite:///") :] not in ("", ":memory:"):
        return Path(url[len("sqlite:///") :] + ".lock")
    return None


def open_storage(url: str, retry: Callable[[Any, Any], None] | None = None) -> Any:
    """An Optuna storage for ``url``: ``journal:///path`` (a journal file), ``sqlite:///path`` (created with its
    directory), or any SQLAlchemy URL Optuna takes (``postgresql://``, ``mysql+pymysql://``). RDB storages keep a
    heartbeat, so a worker that dies on another machine has its trial failed (and ``retry`` called) in minutes.

    Raises:
        ValueError: If the storage cannot be opened.
    """
    optuna = _optuna()
    journal = _journal_path(url)
    try:
        if url.startswith("journal://"):
            if not journal:
                raise ValueError("journal:// needs a path, e.g. journal:///shared/study.log")
            Path(journal).parent.mkdir(parents=True, exist_ok=True)
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(journal))
        kwargs: dict[str, Any] = {"heartbeat_interval": _HEARTBEAT_S, "grace_period": _GRACE_S}
        if retry is not None:
            kwargs["heartbeat_stale_trial_callback"] = retry
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
            # Several workers write one file: wait for SQLite's lock rather than fail at once (5 s by default).
            kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat, stable since 2.9
            return optuna.storages.RDBStorage(url, **kwargs)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 (SQLAlchemy's and drivers' errors: one line, the URL named)
        raise ValueError(
            f"--storage {url}: cannot open it ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None


@contextlib.contextmanager
def _study_lock(path: Path | None) -> Iterator[None]:
    """Exclusive across threads and processes (``flock`` on a file of its own, released if the process dies)."""
    with _THREAD_LOCK:
        if path is None:
            yield
            return
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------- the callback


class OptunaPruning(Callback):
    """Report a metric to an Optuna trial at every validation, keyed by the optimizer step, and stop the run when
    the study's pruner says so (the trial process's half of ``cs336 sweep``).

    Unlike optuna-integration's ``PyTorchLightningPruningCallback`` (one report per epoch), every validation inside
    an epoch counts, and under DDP the decision is taken once on global rank zero and broadcast, so all ranks stop
    at the same step. On pruning it saves a checkpoint where no ``ModelCheckpoint`` does, marks the run record and
    the W&B run (tag ``pruned``; summary ``sweep/state``, ``sweep/pruned_step``), sets the trial's user attribute
    ``pruned_at_step`` and stops the Trainer; the driver then tells the study.

    Args:
        storage: The study's Optuna storage URL (see :func:`open_storage`).
        study_name: The study.
        trial: The trial's number in the study.
        metric: The logged metric to report (``val/loss``).
        pruner: The study's pruner, by name and options (:func:`make_pruner`): Optuna keeps no pruner in the storage,
            so the trial's process must be told which one the driver uses.
        prune: False: report only, never stop.
    """

    def __init__(
        self,
        storage: str,
        study_name: str,
        trial: int,
        metric: str = "val/loss",
        pruner: str = "median",
        prune: bool = True,
    ) -> None:
        super().__init__()
        self.storage, self.study_name, self.trial_number = storage, study_name, trial
        self.metric, self.pruner, self.prune = metric, pruner, prune
        self.pruned_step: int | None = None
        self.last: tuple[int, float] | None = None
        self._trial: Any = None
        self._warned = False

    def _open(self) -> Any:
        if self._trial is None:
            optuna = _optuna()
            storage = open_storage(self.storage) if isinstance(self.storage, str) else self.storage
            study = optuna.load_study(study_name=self.study_name, storage=storage, pruner=make_pruner(self.pruner))
            trial_id = storage.get_trial_id_from_study_id_trial_number(
                storage.get_study_id_from_name(self.study_name), self.trial_number
            )
            self._trial = optuna.trial.Trial(study, trial_id)
        return self._trial

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        trial = self._open()
        values = {"sweep/study": self.study_name, "sweep/trial": self.trial_number, "sweep/metric": self.metric,
                  "sweep/params": dict(trial.params), "sweep/state": "running"}  # fmt: skip
        self._mark(trainer, values, tag=None)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        step = int(trainer.global_step)
        decision = False
        if trainer.is_global_zero:
            decision = self._report(trainer, step)
        # A collective on every rank at every validation: the ranks stop together or not at all.
        decision = bool(trainer.strategy.broadcast(decision, src=0))
        if decision:
            self.pruned_step = step
            trainer.should_stop = True
            if trainer.checkpoint_callback is None:
                trainer.save_checkpoint(self._pruned_path(trainer))
            if trainer.is_global_zero:
                self._mark(trainer, {"sweep/state": "pruned", "sweep/pruned_step": step}, tag="pruned")

    def _report(self, trainer: Any, step: int) -> bool:
        value = trainer.callback_metrics.get(self.metric)
        if value is None:
            if not self._warned:
                self._warned = True
                print(f"cs336: warning: the sweep's metric {self.metric} was not logged at validation", file=sys.stderr)
            return False
        value = float(value)
        self.last = (step, value)
        trial = self._open()
        optuna = _optuna()
        try:
            if math.isfinite(value):
                trial.report(value, step)
            decision = self.prune and (not math.isfinite(value) or trial.should_prune())
            if decision:
                trial.set_user_attr(PRUNED_ATTR, step)
            return decision
        except (RuntimeError, optuna.exceptions.OptunaError) as err:
            # The trial is no longer running (its driver told it failed, e.g. after an interruption): train on.
            if not self._warned:
                self._warned = True
                print(f"cs336: warning: cannot report to trial {self.trial_number}: {err}", file=sys.stderr)
            return False

    def _pruned_path(self, trainer: Any) -> str:
        from lightning_cs336.record import RunRecord

        for logger in trainer.loggers:
            if isinstance(logger, RunRecord):
                return str(Path(logger.log_dir) / "checkpoints" / "pruned.ckpt")
        return str(Path(trainer.default_root_dir) / "pruned.ckpt")

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero and self.pruned_step is None:
            values: dict[str, Any] = {"sweep/state": "complete"}
            if self.last is not None:
                values["sweep/value"] = self.last[1]
            self._mark(trainer, values, tag=None)
        elif trainer.is_global_zero and self.last is not None:
            self._mark(trainer, {"sweep/value": self.last[1]}, tag=None)

    def _mark(self, trainer: Any, values: dict[str, Any], tag: str | None) -> None:
        """Summary values (and a tag) on the run record and the W&B run."""
        from lightning.pytorch.loggers import WandbLogger

        from lightning_cs336.record import RunRecord

        for logger in trainer.loggers:
            if isinstance(logger, RunRecord):
                logger.log_summary(values)
                if tag and tag not in logger.meta["tags"]:
                    logger.update_identity(tags=[*logger.meta["tags"], tag])
                if tag == "pruned":  # the record's state too: `cs336 runs list` shows it pruned, not finished
                    logger.set_state("pruned", f"pruned by the study at step {values.get('sweep/pruned_step')}")
            elif isinstance(logger, WandbLogger):
                try:
                    run = logger.experiment
                    run.summary.update({k: v for k, v in values.items() if not isinstance(v, dict)})
                    if "sweep/params" in values:
                        run.config.update({"sweep": {"trial": self.trial_number, "params": values["sweep/params"]}},
                                          allow_val_change=True)  # fmt: skip
                    if tag and tag not in (run.tags or ()):
                        run.tags = (*(run.tags or ()), tag)
                except Exception as err:  # noqa: BLE001 (W&B is a copy; the record has it)
                    print(f"cs336: warning: could not mark the W&B run ({err})", file=sys.stderr)


# --------------------------------------------------------------------------------------------------- results


@dataclass
class SweepResult:
    """What :func:`run_sweep` did: the study's trials, the best one, and the files written."""

    study: str
    storage: str
    parent: Path
    metric: str
    mode: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    importances: dict[str, float] | None
    importance_note: str | None
    text: str
    ran: int = 0
    failed_here: int = 0
    interrupted: int | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0: every trial this worker ran completed or was pruned; 1: some failed or no trial completed;
        130/143: interrupted by SIGINT/SIGTERM."""
        if self.interrupted:
            return 128 + self.interrupted
        return 1 if self.failed_here or self.best is None else 0


def merge_params(raw: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The config ``raw`` with dotted ``params`` set (through ``init_args`` levels where the config has them)."""
    out = json.loads(json.dumps(raw, default=str))
    for key, value in params.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node.get(part), dict) or part not in node:
                node = node.setdefault(part, {})
                if isinstance(node.get("init_args"), dict) and parts[-1] not in node:
                    node = node["init_args"]
            else:
                node[part] = {}
                node = node[part]
        node[parts[-1]] = value
    return out


def _trial_rows(study: Any) -> list[dict[str, Any]]:
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials if t.user_attrs.get("retry_of") is not None}
    rows = []
    for t in trials:
        if t.user_attrs.get("surplus"):
            continue
        duration = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )  # noqa: E501
        rows.append({
            "number": t.number,
            "state": t.state.name.lower(),
            "value": _finite(t.value) if t.value is not None else None,
            "params": dict(t.params) or dict(t.system_attrs.get("fixed_params") or {}),  # a queued retry's too
            "run": t.user_attrs.get("run"),
            "path": t.user_attrs.get("path"),
            "pruned_at_step": t.user_attrs.get(PRUNED_ATTR),
            "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
            "error": t.user_attrs.get("error"),
            "retry_of": t.user_attrs.get("retry_of"),
            "retried": t.number in retried,
            "seconds": round(duration, 1) if duration is not None else None,
        })  # fmt: skip
    return rows


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _importances(study: Any) -> tuple[dict[str, float] | None, str | None]:
    optuna = _optuna()
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < 2:
        return None, f"parameter importances need at least 2 complete trials ({len(complete)} so far)"
    try:
        return dict(optuna.importance.get_param_importances(study)), None
    except (RuntimeError, ValueError) as err:
        return None, f"parameter importances unavailable: {err}"


def _format(result_rows: list[dict[str, Any]], space: Sequence[str], metric: str) -> str:
    columns = ["trial", "state", metric, *space, "run"]
    rows = []
    for r in result_rows:
        state = r["state"] + (f"@{r['pruned_at_step']}" if r["pruned_at_step"] is not None else "")
        rows.append(
            [str(r["number"]), state, r["value"], *(_short(r["params"].get(k)) for k in space), r["run"] or "-"]
        )
    return ablate.format_table(columns, rows)


def _short(value: Any) -> Any:
    return f"{value:.4g}" if isinstance(value, float) else value


# --------------------------------------------------------------------------------------------------- the driver


def _print_config(config: Path, args: Sequence[str]) -> dict[str, Any]:
    """``cs336 fit --config CONFIG ARGS --print_config`` in this process, as a dict; its error as a ValueError.

    In-process rather than ablate's subprocess: each ``cs336 fit`` process pays seconds of imports, and a sweep
    worker imports Lightning once and then parses in well under a second per check.
    """
    from lightning_cs336.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    code: Any = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(["fit", "--config", str(config), *args, "--print_config"])
    except SystemExit as exit_info:
        code = exit_info.code
    finally:
        os.environ.clear()
        os.environ.update(saved)  # cs336 fit may set WANDB_MODE; every trial decides that for itself
    if code not in (0, None):
        error = ablate._error_of(err.getvalue() + out.getvalue(), int(code) if isinstance(code, int) else 2)
        raise ValueError(error.removeprefix("cs336: error: ").removeprefix("error: "))
    data = yaml.safe_load(out.getvalue())
    if not isinstance(data, dict):
        raise ValueError(f"`cs336 fit --config {config} --print_config` printed no config")
    return data


def _callback_arg(storage: str, study: str, trial: int, metric: str, pruner: str) -> str:
    init = {"storage": storage, "study_name": study, "trial": trial, "metric": metric, "pruner": pruner}
    return "--trainer.callbacks+=" + json.dumps({"class_path": CALLBACK, "init_args": init})


def _param_args(params: Mapping[str, Any]) -> list[str]:
    return [f"--{k}={ablate.cli_value(v)}" for k, v in params.items()]


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _retry(study: Any, trial: Any) -> None:
    """A failed-because-interrupted trial: its parameters again, first in line."""
    study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})


def _counts(study: Any) -> tuple[int, int]:
    """(trials that count toward the total, trials waiting in the queue)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    counted = waiting = 0
    for t in trials:
        if t.user_attrs.get("surplus"):
            continue
        if t.state.name == "WAITING":
            waiting += 1
        elif not (t.state.name == "FAIL" and t.number in retried):
            counted += 1
    return counted, waiting


def _free_stale(study: Any, say: Callable[[str], None]) -> None:
    """Trials left RUNNING by a dead driver on this host (or, RDB, without a heartbeat): failed, and retried."""
    optuna = _optuna()
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("host") == host and not _pid_alive(t.user_attrs.get("driver_pid")):
            try:
                study._storage.set_trial_user_attr(t._trial_id, "error", "interrupted: its driver is gone")
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            except (RuntimeError, optuna.exceptions.OptunaError):
                continue  # another worker freed it first
            _retry(study, t)
            say(f"trial {t.number} was left running by a driver that is gone: failed, its parameters queued again")
    # Other hosts' dead workers: with RDB storage `study.ask` fails the trials whose heartbeat stopped, and the
    # storage's callback (`_retry`) queues them again.


def run_sweep(
    config: str | os.PathLike[str],
    space: str | os.PathLike[str] | Mapping[str, Any],
    trials: int = 20,
    study: str | None = None,
    storage: str | None = None,
    sampler: str = "tpe",
    pruner: str = "median",
    metric: str = "val/loss",
    mode: str = "min",
    seed: int | None = None,
    jobs: int = 1,
    extra_args: Sequence[str] = (),
    echo: Callable[[str], None] | None = None,
) -> SweepResult:
    """Run (or continue, or join) a study until it holds ``trials`` trials, then summarize it.

    Args:
        config: The base config (``cs336 fit --config``).
        space: The search space: a YAML file or a mapping (see :func:`parse_space`).
        trials: The study's total number of trials (all workers together; the grid's size at most).
        study: The study's name (W&B group, run-name prefix, file names); default ``<config stem>-<space stem>``.
        storage: An Optuna storage URL (see :func:`open_storage`); default :func:`default_storage`.
        sampler: :data:`SAMPLERS` name, with options (``tpe:n_startup_trials=5``).
        pruner: :data:`PRUNERS` name, with options (``median:n_startup_trials=2``).
        metric: The logged metric to optimize and report.
        mode: ``min`` or ``max``.
        seed: Sampler seed: trial ``k`` of the study samples with ``seed + k``, so a study is reproducible whichever
            worker runs which trial.
        jobs: Trials at once in this worker (each its own process).
        extra_args: More ``cs336 fit`` arguments for every trial (e.g. ``--trainer.devices=2``).
        echo: Where progress lines go (default stderr).

    Raises:
        FileNotFoundError: If the config or the space file does not exist.
        ValueError: On bad input, found before anything is created or launched.
    """
    say = echo or (lambda line: print(f"cs336: {line}", file=sys.stderr, flush=True))
    config = Path(config)
    if not config.is_file():
        raise FileNotFoundError(f"config {config} does not exist: pass --config PATH to a cs336 fit config")
    params = parse_space(space, "the space") if isinstance(space, Mapping) else load_space(space)
    if mode not in ("min", "max"):
        raise ValueError(f"--mode must be min or max, got {mode!r}")
    if not metric:
        raise ValueError("--metric must name a metric (e.g. val/loss)")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"--trials must be at least 1, got {trials}")
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    for arg in extra_args:
        key = arg.removeprefix("--").split("=", 1)[0]
        if arg.startswith("--") and any(key == r or key.startswith(r + ".") for r in ablate._RESERVED[1:]):
            raise ValueError(f"extra argument {arg!r}: the sweep names its trials itself (use --study)")
        if key in _OWN_ARGS or key in params:
            raise ValueError(f"extra argument {arg!r} cannot be given to a sweep's trials (the sweep sets it)")
    optuna = _optuna()
    make_sampler(sampler, params, seed)  # bad names and options fail here, before anything exists
    pruner_obj = make_pruner(pruner)
    grid_size = math.prod(len(p.grid()) for p in params.values()) if sampler.startswith("grid") else None
    target = min(trials, grid_size) if grid_size else trials
    name = (
        ablate._sanitize(study)
        if study
        else ablate._sanitize(
            f"{config.stem}-{Path(str(space)).stem}" if not isinstance(space, Mapping) else config.stem
        )
    )
    try:
        raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config {config} is not YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config {config} is not a mapping of cs336 fit options")

    # Every key and both ends of every range parse before anything is created: a typo is an error in seconds.
    say(f"sweep {name}: checking the config and {len(params)} parameter(s)")
    probe = f"{name}.check"
    name_args = ablate._name_args(raw, probe, Path(probe))
    callback = _callback_arg("sqlite:///probe.db", name, 0, metric, pruner)
    dump: dict[str, Any] = {}
    for end in (0, 1):
        values = {k: p.ends()[end] for k, p in params.items()}
        try:
            result = _print_config(config, [*_param_args(values), *name_args, callback, *extra_args])
        except ValueError as err:
            shown = " ".join(f"{k}={ablate.cli_value(v)}" for k, v in values.items())
            raise ValueError(f"{shown}: {err}") from None
        dump = dump or result
    records = ablate._entries(dump, "logger", "RunRecord")
    if not records or (records[0].get("init_args") or {}).get("name") != probe:
        raise ValueError(f"cannot name the sweep's trials: `cs336 fit --config {config}` does not take the run name")
    parent = Path(records[0]["init_args"]["save_dir"]).absolute()
    url = storage or default_storage(parent, name)
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        url = f"sqlite:///{Path(url[len('sqlite:///') :]).absolute()}"  # the trials may run in another directory
    journal = _journal_path(url)
    if journal and not Path(journal).is_absolute():
        url = f"journal://{Path(journal).absolute()}"

    direction = "minimize" if mode == "min" else "maximize"
    with _study_lock(_lock_path(url)):
        # Under the lock: two workers creating a new SQLite file would both create its tables, and one would fail.
        store = open_storage(url, retry=_retry)
        the_study = optuna.create_study(storage=store, study_name=name, direction=direction, load_if_exists=True)
        if the_study.direction.name.lower() != direction:
            raise ValueError(f"study {name} in {url} {the_study.direction.name.lower()}s; --mode {mode} disagrees")
        if "metric" not in the_study.user_attrs:
            for key, value in (("metric", metric), ("config", str(config.absolute())), ("parent", str(parent)),
                               ("space", {k: p.to_dict() for k, p in params.items()})):  # fmt: skip
                the_study.set_user_attr(key, value)
        elif the_study.user_attrs["metric"] != metric:
            raise ValueError(f"study {name} optimizes {the_study.user_attrs['metric']}; --metric {metric} disagrees")
    the_study.pruner = pruner_obj
    done, waiting = _counts(the_study)
    say(f"sweep {name}: study in {url}, {done} of {target} trial(s) there ({waiting} queued), runs in {parent}")

    dists = {k: p.distribution() for k, p in params.items()}
    lock = _lock_path(url)
    stop = threading.Event()
    children: dict[int, subprocess.Popen[bytes]] = {}
    ran = itertools.count()
    failed_here = [0]
    interrupted: list[int] = []
    log_dir = parent / "sweeps" / name / "logs"

    def next_trial() -> Any:
        with _study_lock(lock):
            _free_stale(the_study, say)
            counted, _ = _counts(the_study)
            if counted >= target or stop.is_set():
                return None
            k = len(the_study.get_trials(deepcopy=False))
            the_study.sampler = make_sampler(sampler, params, None if seed is None else seed + k)
            with warnings.catch_warnings():
                # "Heartbeat of storage is supposed to be used with Study.optimize": _Heartbeat beats for the trial.
                warnings.simplefilter("ignore", UserWarning)
                trial = the_study.ask(dists)
            if lock is None:  # a database server: no lock, so check that no other worker took the last place
                earlier = [t for t in the_study.get_trials(deepcopy=False) if t.number < trial.number]
                if sum(1 for t in earlier if not t.user_attrs.get("surplus") and t.state.name != "WAITING") >= target:
                    trial.set_user_attr("surplus", True)
                    the_study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    return None
            trial.set_user_attr("host", socket.gethostname())
            trial.set_user_attr("driver_pid", os.getpid())
            return trial

    def run_trial(trial: Any) -> None:
        base = f"{name}.trial-{trial.number}"
        run = ablate._next_name(parent, base)
        trial.set_user_attr("run", run)
        trial.set_user_attr("path", str(parent / run))
        args = [*_param_args(trial.params), *ablate._name_args(raw, base, parent / run)]
        command = ablate._fit_command(
            config, [*args, _callback_arg(url, name, trial.number, metric, pruner), *extra_args]
        )
        tags = [t.strip() for t in [*os.environ.get("WANDB_TAGS", "").split(","), "sweep", f"trial-{trial.number}"]]
        env = {**os.environ, "WANDB_RUN_GROUP": name, "WANDB_TAGS": ",".join(dict.fromkeys(t for t in tags if t))}
        log = log_dir / f"{run}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        shown = " ".join(f"{k}={ablate.cli_value(v)}" for k, v in trial.params.items())
        say(f"trial {trial.number} ({run}): {shown}")
        started, start = time.time(), time.monotonic()
        beat = _Heartbeat(store, trial._trial_id)
        with open(log, "wb") as fh:
            proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
                                    preexec_fn=_die_with_parent if sys.platform == "linux" else None)  # fmt: skip
            children[trial.number] = proc
            beat.start()
            try:
                rc = proc.wait()
            finally:
                beat.stop()
                children.pop(trial.number, None)
        seconds = round(time.monotonic() - start, 1)
        text = log.read_text(encoding="utf-8", errors="replace")
        record = ablate.find_record(parent, base)
        if record is not None:
            created = (json.loads((record / "run.json").read_text(encoding="utf-8")) or {}).get("created_at") or 0
            record = record if created >= started - 1 else None
        if record is not None and record.name != run:
            trial.set_user_attr("run", record.name)
            trial.set_user_attr("path", str(record))
        TS = optuna.trial.TrialState
        if stop.is_set():
            trial.set_user_attr("error", "interrupted")
            the_study.tell(trial, state=TS.FAIL, skip_if_finished=True)
            _retry(the_study, trial)
            say(f"trial {trial.number} interrupted after {seconds}s: failed, its parameters queued again")
            return
        next(ran)
        if rc != 0:
            error = ablate._error_of(text, rc)
            trial.set_user_attr("error", error[:500])
            the_study.tell(trial, state=TS.FAIL, skip_if_finished=True)
            failed_here[0] += 1
            say(f"trial {trial.number} failed in {seconds}s: {error}")
            return
        # From the storage: `Trial.user_attrs` is this process's cached copy, and the trial's process set this one.
        pruned_at = store.get_trial(trial._trial_id).user_attrs.get(PRUNED_ATTR)
        if pruned_at is not None:
            the_study.tell(trial, state=TS.PRUNED, skip_if_finished=True)
            say(f"trial {trial.number} pruned at step {pruned_at} after {seconds}s")
            return
        from lightning_cs336.runs import final, load_run

        value = final(load_run(record), metric) if record is not None else None
        if value is None or not math.isfinite(value):
            error = "the run left no record" if record is None else f"the run logged no finite {metric}"
            trial.set_user_attr("error", error)
            the_study.tell(trial, state=TS.FAIL, skip_if_finished=True)
            failed_here[0] += 1
            say(f"trial {trial.number} failed in {seconds}s: {error}")
            return
        the_study.tell(trial, value, skip_if_finished=True)
        say(f"trial {trial.number} complete in {seconds}s: {metric} {value:.4f}")

    errors: list[BaseException] = []

    def worker() -> None:
        try:
            while not stop.is_set():
                trial = next_trial()
                if trial is None:
                    return
                run_trial(trial)
        except BaseException as err:  # noqa: BLE001 (raised again in the main thread, below)
            errors.append(err)
            stop.set()

    def on_signal(signum: int, frame: Any) -> None:
        if not stop.is_set():
            say(f"{signal.Signals(signum).name}: stopping the running trial(s); they will be retried on the next run")
        stop.set()
        interrupted.append(signum)
        for proc in list(children.values()):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, on_signal)
    try:
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.5)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if errors:
        raise errors[0]

    result = summarize(the_study, url, parent, raw, params, metric, mode)
    result.ran, result.failed_here = next(ran), failed_here[0]
    result.interrupted = interrupted[0] if interrupted else None
    _write_outputs(result, raw, parent / "sweeps", say)
    return result


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the driver dies (Linux), so a killed driver leaves no trial behind."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Heartbeat:
    """Optuna's RDB heartbeat for a trial whose process is not this one's (``study.optimize`` does it for its own)."""

    def __init__(self, storage: Any, trial_id: int) -> None:
        enabled = hasattr(storage, "record_heartbeat") and storage.get_heartbeat_interval() is not None
        self._storage, self._trial_id = (storage if enabled else None), trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self._storage.record_heartbeat(self._trial_id)
            self._stop.wait(self._storage.get_heartbeat_interval() or _HEARTBEAT_S)

    def start(self) -> None:
        if self._storage is not None:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()


# --------------------------------------------------------------------------------------------------- outputs


def summarize(
    study: Any,
    storage: str,
    parent: Path,
    raw: Mapping[str, Any],
    space: Mapping[str, Param],
    metric: str,
    mode: str,
) -> SweepResult:
    """The study's trials, best trial and importances, and their text."""
    rows = _trial_rows(study)
    complete = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    pick = min if mode == "min" else max
    best = pick(complete, key=lambda r: r["value"]) if complete else None
    importances, note = _importances(study)
    keys = list(dict.fromkeys([*space, *(k for r in rows for k in r["params"])]))
    counts = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running", "waiting")}
    lines = [f"sweep {study.study_name}: {metric} ({mode}), " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)]
    lines.append(_format(rows, keys, metric))
    if best is not None:
        shown = " ".join(f"{k}={ablate.cli_value(v)}" for k, v in best["params"].items())
        lines.append(f"best: trial {best['number']} ({best['run']}): {metric} {best['value']:.4f} with {shown}")
    else:
        lines.append("best: no trial completed yet")
    if importances:
        lines.append("importances: " + ", ".join(f"{k} {v:.3f}" for k, v in importances.items()))
    elif note:
        lines.append(f"importances: skipped ({note})")
    return SweepResult(
        study=study.study_name,
        storage=storage,
        parent=parent,
        metric=metric,
        mode=mode,
        trials=rows,
        best=best,
        importances=importances,
        importance_note=note,
        text="\n".join(lines),
    )


def _write_outputs(result: SweepResult, raw: Mapping[str, Any], out_dir: Path, say: Callable[[str], None]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    name = result.study
    if result.best is not None:
        best_yaml = out_dir / f"{name}.best.yaml"
        header = (f"# Best trial {result.best['number']} of sweep {name} ({result.metric} {result.best['value']:.6g}):"
                  f" the base config with its parameters.\n# cs336 fit --config {best_yaml}\n")  # fmt: skip
        text = header + yaml.safe_dump(merge_params(raw, result.best["params"]), sort_keys=False)
        ablate._write_atomic(best_yaml, text)
        result.files["best_config"] = best_yaml
    data = {
        "study": name,
        "storage": result.storage,
        "parent": str(result.parent),
        "metric": result.metric,
        "mode": result.mode,
        "created_at": time.time(),
        "best": result.best,
        "importances": result.importances,
        "importance_note": result.importance_note,
        "trials": result.trials,
    }
    json_path = out_dir / f"{name}.json"
    ablate._write_atomic(json_path, json.dumps(ablate._jsonable(data), indent=2, allow_nan=False) + "\n")
    keys = list(dict.fromkeys(k for r in result.trials for k in r["params"]))
    columns = ["trial", "state", result.metric, *keys, "run"]
    table = [
        [r["number"], r["state"], r["value"], *(_short(r["params"].get(k)) for k in keys), r["run"]]
        for r in result.trials
    ]
    md = [f"# Sweep `{name}`", "", f"{result.metric} ({result.mode}); study `{result.storage}`.", "",
          ablate.format_markdown(columns, table), ""]  # fmt: skip
    if result.best is not None:
        md += [f"Best: trial {result.best['number']} (`{result.best['run']}`), {result.metric} "
               f"{result.best['value']:.6g}; config `{result.files['best_config']}`.", ""]  # fmt: skip
    if result.importances:
        md += ["| parameter | importance |", "|:--|--:|"] + [
            f"| {k} | {v:.3f} |" for k, v in result.importances.items()
        ]
    elif result.importance_note:
        md.append(f"Importances skipped: {result.importance_note}.")
    md_path = out_dir / f"{name}.md"
    ablate._write_atomic(md_path, "\n".join(md) + "\n")
    result.files.update(json=json_path, md=md_path)
    try:
        html = _html_report(result, out_dir / f"{name}.html")
    except (OSError, ValueError) as err:
        say(f"the HTML report failed ({err})")
        html = None
    if html is not None:
        result.files["html"] = html


def sweep_table(result: SweepResult) -> dict[str, Any]:
    """The report's sweep view: the metric, the mode and one row per trial that has a run."""
    rows = []
    for r in result.trials:
        if r["state"] in ("waiting",):
            continue
        value = r["value"]
        if value is None and r["intermediate"]:
            value = list(r["intermediate"].values())[-1]
        rows.append({"label": f"trial-{r['number']}", "run": r["run"], "state": r["state"], "params": r["params"],
                     "value": value, "step": r["pruned_at_step"]})  # fmt: skip
    return {"metric": result.metric, "mode": result.mode, "rows": rows}


def _html_report(result: SweepResult, path: Path) -> Path | None:
    from lightning_cs336.report import write_report
    from lightning_cs336.runs import load_run

    runs = []
    for r in result.trials:
        if r["path"] and Path(r["path"]).is_dir():
            try:
                runs.append(load_run(Path(r["path"])))
            except (OSError, ValueError):
                continue
    if not runs:
        return None
    return write_report(runs, path, title=f"Sweep {result.study}: {result.metric}", sweep=sweep_table(result))


# --------------------------------------------------------------------------------------------------- W&B sweeps


_WANDB_METHODS = {"tpe": "bayes", "random": "random", "grid": "grid"}


def wandb_sweep_config(
    config: str | os.PathLike[str],
    space: Mapping[str, Param],
    metric: str = "val/loss",
    mode: str = "min",
    sampler: str = "tpe",
    pruner: str = "none",
    extra_args: Sequence[str] = (),
    name: str | None = None,
) -> dict[str, Any]:
    """A W&B sweep configuration (``wandb sweep FILE``) for the same search: method, metric, the parameters under
    their dotted keys, and a ``command`` running ``python -m lightning_cs336 fit --config BASE ${args}``, so every
    DDP rank gets the trial's parameters on its command line (W&B hands ``wandb.config`` to rank zero only).

    TPE maps to W&B's ``bayes``; the pruners to W&B's only early-termination rule, ``hyperband``.
    """
    method = _WANDB_METHODS[_spec(sampler, "sampler", SAMPLERS)[0]]
    pruner_name, pruner_kwargs = _spec(pruner, "pruner", PRUNERS)
    parameters: dict[str, Any] = {}
    for key, p in space.items():
        if p.type == "categorical":
            parameters[key] = {"values": list(p.choices)}
        elif method == "grid" or p.step is not None:
            parameters[key] = {"values": p.grid()}
        elif p.type == "int":
            parameters[key] = {"distribution": "q_log_uniform_values" if p.log else "int_uniform",
                               "min": p.low, "max": p.high} | ({"q": 1} if p.log else {})  # fmt: skip
        else:
            parameters[key] = {"distribution": "log_uniform_values" if p.log else "uniform", "min": p.low,
                               "max": p.high}  # fmt: skip
    out: dict[str, Any] = {
        "program": "lightning_cs336",  # informational: `command` below is what the agent runs
        "method": method,
        "metric": {"name": metric, "goal": "minimize" if mode == "min" else "maximize"},
        "parameters": parameters,
        "command": [
            "${env}",
            "${interpreter}",
            "-m",
            "lightning_cs336",
            "fit",
            "--config",
            str(Path(config).absolute()),
            *extra_args,
            "${args}",
        ],  # fmt: skip
    }
    if name:
        out["name"] = name
    if pruner_name != "none":
        min_iter = pruner_kwargs.get("min_resource")
        out["early_terminate"] = {"type": "hyperband", "min_iter": int(min_iter) if isinstance(min_iter, int) else 1}
    return out


def wandb_args(parameters: Mapping[str, Any]) -> list[str]:
    """The command-line arguments a W&B agent's ``${args}`` makes of one set of values: ``--key=value``."""
    return [f"--{k}={v}" for k, v in parameters.items()]

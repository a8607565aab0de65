"""Hyperparameter ablations (the seed's ``log_hyperparameter_ablation``): the baseline config and each variant of a
grid over ``--vary`` keys, times each seed, each run its own ``cs336 fit`` process, then one table.

Each run is ``python -m lightning_cs336 fit --config BASE --model.num_heads=8 --seed_everything=1 ...`` in its own
process (one crash, OOM or bad value cannot take the others down), named ``<ablation>.<key>=<value>...-s<seed>``
(``<ablation>.baseline-s<seed>`` for the baseline), in the W&B group ``<ablation>`` (``WANDB_RUN_GROUP``) with the
tags ``ablation`` and its variant (``WANDB_TAGS``). So every run is an ordinary ``cs336 fit`` run in
``<root>/<project>/<name>/`` (see :mod:`lightning_cs336.experiment`), and ``cs336 runs`` reads it.

Before anything is launched, the base config is parsed with ``cs336 fit --print_config`` and the overrides (one
parse for the baseline, one per value index: value ``i`` of every key together), so a misspelt key or a value of the
wrong type is an error in seconds, not a failed run. That parse also says where the runs go: the run record's
``save_dir`` (``<root>/<project>``), exactly what ``cs336 fit`` will use.

Re-running the same ablation skips the runs whose newest record (``<name>``, ``<name>-2``, ...) is ``finished``;
the others run again (a run that left a record gets the next ``-N`` name, as ``cs336 fit`` does). The results land
in ``<root>/<project>/ablations/``:

- ``<ablation>.json`` (the table, every run with its state, metric values, error, log and directory) and
  ``<ablation>.md`` (the table in Markdown, the failures below it), and ``<ablation>.html`` where
  :mod:`lightning_cs336.report` is installed;
- ``<ablation>/``: a run record of its own (tag ``ablation-summary``, table ``ablation/table``) and, unless W&B is
  off, a small W&B run ``<ablation>-summary`` in the same group holding the table;
- ``<ablation>/logs/<run name>.log``: each run's stdout and stderr.

Example::

    from lightning_cs336.ablate import run_ablation

    result = run_ablation("configs/quickstart.yaml", ["model.num_heads=2,8", "model.max_lr=1e-3,3e-3"], seeds=[0, 1])
    print(result.text)  # the aligned table; result.exit_code is 0 when every run finished
"""

from __future__ import annotations

import itertools
import json
import math
import os
import queue
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "COLUMNS",
    "AblationResult",
    "RunResult",
    "Variant",
    "cli_value",
    "default_name",
    "expand_grid",
    "find_record",
    "format_markdown",
    "format_table",
    "parse_seeds",
    "parse_value",
    "parse_vary",
    "run_ablation",
    "run_name",
    "split_values",
    "summarize",
]

#: The ablation table's columns (one row per variant, the baseline first). ``n``: seeds whose run finished and
#: logged the metric; ``*_std``: sample standard deviation over them (None below two); ``delta_*``: the variant's mean
#: minus the baseline's.
COLUMNS = (
    "variant",
    "n",
    "failed",
    "final_mean",
    "final_std",
    "best_mean",
    "best_std",
    "delta_final",
    "delta_best",
)
TABLE_KEY = "ablation/table"
BASELINE = "baseline"
# Keys the ablation sets itself (run names and places), or that would spread one ablation over several projects.
_RESERVED = ("trainer.default_root_dir", "trainer.logger", "logging.project_name", "logging.experiment_name")
_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
# YAML 1.2 floats PyYAML (YAML 1.1) reads as strings: ``1e-3``, ``5E4`` (no dot, or an unsigned exponent).
_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")


# --------------------------------------------------------------------------------------------------- parsing


def split_values(text: str) -> list[str]:
    """``"1e-3,3e-3"`` as ``["1e-3", "3e-3"]``: split on the commas outside brackets and quotes, so
    ``"[a,b],[c]"`` is two lists and ``'"a,b",c'`` two strings."""
    parts: list[str] = []
    depth, quote, current = 0, "", []
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    if quote or depth:
        raise ValueError(f"unbalanced {'quote' if quote else 'brackets'} in {text!r}")
    parts.append("".join(current).strip())
    return parts


def parse_value(text: str) -> Any:
    """One value as a YAML scalar (or flow list/mapping): ``1e-3`` is a float, ``true`` a bool, ``null`` None,
    ``'"8"'`` the string ``"8"``."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{text!r} is not a YAML value: {str(err).splitlines()[0]}") from err
    if isinstance(value, str) and value == text.strip() and _FLOAT.match(value):
        return float(value)  # YAML 1.2 reads `1e-3` as a float; PyYAML's 1.1 as a string
    return value


def parse_vary(spec: str) -> tuple[str, list[Any]]:
    """``"model.num_heads=4,8,16"`` as ``("model.num_heads", [4, 8, 16])``.

    Raises:
        ValueError: If the spec has no ``=``, the key is not a dotted name or is one the ablation sets itself, or a
            value is empty, not YAML, or given twice.
    """
    key, sep, text = spec.partition("=")
    key = key.strip().removeprefix("--")
    if not sep or not text.strip():
        raise ValueError(f"--vary {spec!r}: expected KEY=V1,V2,... (e.g. --vary model.num_heads=4,8,16)")
    if not _KEY.match(key):
        raise ValueError(f"--vary {spec!r}: {key!r} is not a dotted config key (e.g. model.max_lr)")
    if any(key == r or key.startswith(r + ".") for r in _RESERVED):
        raise ValueError(f"--vary {spec!r}: the ablation sets {key} itself (its runs' names and directory)")
    texts = split_values(text)
    if any(not t for t in texts):
        raise ValueError(f"--vary {spec!r}: empty value (a stray comma?)")
    values = [parse_value(t) for t in texts]
    shown = [cli_value(v) for v in values]
    if len(set(shown)) != len(shown):
        raise ValueError(f"--vary {spec!r}: a value is given twice")
    return key, values


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` as ``[0, 1, 2]``; each seed once."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected integers separated by commas (e.g. --seeds 0,1,2)") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: a seed is given twice")
    return seeds


def cli_value(value: Any) -> str:
    """A value as ``cs336 fit`` command-line text that parses back to the same value (floats keep a dot, since
    PyYAML reads ``1e-05`` as a string; strings that YAML would read as something else are quoted)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value)
        if "e" in text and "." not in text:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent if exponent[0] in '+-' else '+' + exponent}"
        return text
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return value if same and value.strip() == value and "," not in value else json.dumps(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


# --------------------------------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Variant:
    """One condition of the ablation: the baseline (no overrides) or one point of the grid."""

    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """``baseline``, or ``model.max_lr=0.01 model.num_heads=4``."""
        return " ".join(f"{k}={cli_value(v)}" for k, v in self.overrides) or BASELINE

    def args(self) -> list[str]:
        """The overrides as ``cs336 fit`` arguments."""
        return [f"--{k}={cli_value(v)}" for k, v in self.overrides]


def expand_grid(varies: Sequence[tuple[str, Sequence[Any]]]) -> list[Variant]:
    """The baseline, then every combination of the varied values (the first key varying slowest).

    Raises:
        ValueError: If no key is varied, or a key is varied twice.
    """
    keys = [k for k, _ in varies]
    if not keys:
        raise ValueError("nothing to ablate: pass at least one --vary KEY=V1,V2")
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"--vary {repeated[0]} is given twice: list all its values in one --vary")
    grid = itertools.product(*(values for _, values in varies))
    return [Variant(), *(Variant(tuple(zip(keys, point, strict=True))) for point in grid)]


def _sanitize(text: str) -> str:
    # The characters experiment.render_name keeps, so the name cs336 fit renders is the name given here.
    return "".join(c if c.isalnum() or c in "-_.=+" else "-" for c in text).strip("-.") or "run"


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """``model.max_lr`` as ``max_lr`` in run names, unless two varied keys end the same."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: s if last.count(s) == 1 else k for k, s in zip(keys, last, strict=True)}


def default_name(config: str | os.PathLike[str], keys: Sequence[str]) -> str:
    """``<config stem>-<varied keys>``, e.g. ``quickstart-num_heads+max_lr``."""
    short = _short_keys(keys)
    return _sanitize(f"{Path(config).stem}-{'+'.join(short[k] for k in keys)}")


def run_name(ablation: str, variant: Variant, seed: int | None, keys: Sequence[str] = ()) -> str:
    """The run's name: ``<ablation>.<key>=<value>...-s<seed>`` (``<ablation>.baseline-s<seed>``)."""
    short = _short_keys(list(keys) or [k for k, _ in variant.overrides])
    pairs = [f"{short.get(k, k)}={cli_value(v)}" for k, v in variant.overrides] or [BASELINE]
    return _sanitize(".".join([ablation, *pairs]) + (f"-s{seed}" if seed is not None else ""))


# --------------------------------------------------------------------------------------------------- results


@dataclass
class RunResult:
    """One run of the ablation (one variant, one seed)."""

    variant: str
    seed: int | None
    name: str
    state: str = "pending"
    """``finished``, ``failed``, ``killed``, ``preempted``, ``running`` (elsewhere), or ``pending``."""
    path: Path | None = None
    skipped: bool = False
    """It had finished before this invocation, so it was not run again."""
    error: str | None = None
    log: Path | None = None
    seconds: float | None = None
    final: float | None = None
    best: float | None = None
    best_step: int | None = None
    command: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("variant", "seed", "name", "state", "skipped", "error", "seconds")}
        out.update(final=_finite(self.final), best=_finite(self.best), best_step=self.best_step)
        out.update(path=str(self.path) if self.path else None, log=str(self.log) if self.log else None)
        out["command"] = self.command
        return out


@dataclass
class AblationResult:
    """What :func:`run_ablation` did: the table, every run, and the files written."""

    name: str
    project: str | None
    parent: Path
    metric: str
    mode: str
    seeds: list[int | None]
    variants: list[dict[str, Any]]
    runs: list[RunResult]
    columns: list[str]
    rows: list[list[Any]]
    text: str
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def failed(self) -> list[RunResult]:
        return [r for r in self.runs if r.state != "finished"]

    @property
    def exit_code(self) -> int:
        """0 when every run finished, 1 otherwise."""
        return 1 if self.failed else 0


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _jsonable(value: Any) -> Any:
    """A copy JSON can hold: non-finite floats as strings (``"inf"``), as the run record writes them."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _stats(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(
    variants: Sequence[tuple[str, Sequence[RunResult]]], metric: str = "val/loss"
) -> tuple[list[str], list[list[Any]], list[dict[str, Any]]]:
    """The ablation table from each variant's runs (the baseline first; see :data:`COLUMNS`).

    Args:
        variants: ``(label, runs)`` per variant, baseline first; ``final``/``best`` of the runs are set.
        metric: The metric's name (for the per-variant dicts only).

    Returns:
        The columns, the rows, and one dict per variant (the row's values by name, plus the values per seed).
    """
    rows: list[list[Any]] = []
    details: list[dict[str, Any]] = []
    base: tuple[float | None, float | None] = (None, None)
    for i, (label, runs) in enumerate(variants):
        done = [r for r in runs if r.state == "finished"]
        finals = [r.final for r in done if r.final is not None and not math.isnan(r.final)]
        bests = [r.best for r in done if r.best is not None and not math.isnan(r.best)]
        final_mean, final_std = _stats(finals)
        best_mean, best_std = _stats(bests)
        if i == 0:
            base = (final_mean, best_mean)
        delta_final = final_mean - base[0] if final_mean is not None and base[0] is not None else None
        delta_best = best_mean - base[1] if best_mean is not None and base[1] is not None else None
        failed = sum(r.state != "finished" for r in runs)
        row = [label, len(finals), failed, final_mean, final_std, best_mean, best_std, delta_final, delta_best]
        rows.append(row)
        detail = dict(zip(COLUMNS, row, strict=True))
        detail.update(metric=metric, finals=finals, bests=bests, runs=[r.name for r in runs])
        details.append(detail)
    return list(COLUMNS), rows, details


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The table as aligned text: the first column left-aligned, numbers right-aligned, ``-`` for no value."""
    cells = [list(columns), *([_cell(v) for v in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = []
    for r in cells:
        parts = [r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def format_markdown(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The table in Markdown (numbers right-aligned)."""

    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(esc(c) for c in columns) + " |", "|:--|" + "--:|" * (len(columns) - 1)]
    lines += ["| " + " | ".join(esc(_cell(v)) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- processes


def _fit_command(config: Path, args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "lightning_cs336", "fit", "--config", str(config), *args]


def _error_of(text: str, returncode: int) -> str:
    """Why a run failed: its last ``cs336: error:`` line, else a parser's ``error:`` message, else the last line of
    its traceback, else the exit status."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("cs336: error:"):
            return line
    for i, line in enumerate(lines):
        if line.startswith("error:"):  # jsonargparse: "error: Parser key ...:" and the reason on the next lines
            return " ".join(part.strip() for part in lines[i : i + 3] if not part.startswith("tip:"))
    if any(line.startswith("Traceback") for line in lines):
        for line in reversed(lines):
            if not line.startswith((" ", "\t")) and re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b", line):
                return line
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return lines[-1] if lines else f"exit status {returncode}"


def _print_config(command: list[str]) -> dict[str, Any]:
    """Run ``cs336 fit ... --print_config`` and return the config it prints; its error as a ValueError."""
    proc = subprocess.run([*command, "--print_config"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        error = _error_of(proc.stderr + proc.stdout, proc.returncode).removeprefix("cs336: error: ")
        raise ValueError(error.removeprefix("error: "))
    data = yaml.safe_load(proc.stdout)
    if not isinstance(data, dict):
        raise ValueError(f"`{' '.join(command)} --print_config` printed no config")
    return data


def _entries(dump: dict[str, Any], section: str, suffix: str) -> list[dict[str, Any]]:
    value = (dump.get("trainer") or {}).get(section)
    items = value if isinstance(value, list) else [value]
    return [e for e in items if isinstance(e, dict) and str(e.get("class_path", "")).endswith(suffix)]


def _lookup(dump: dict[str, Any], key: str) -> tuple[bool, Any]:
    """The value at a dotted key of a printed config (``init_args`` levels are looked through)."""
    node: Any = dump
    for part in key.split("."):
        if isinstance(node, dict) and part not in node and isinstance(node.get("init_args"), dict):
            node = node["init_args"]
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _name_args(raw: dict[str, Any], name: str, run_dir: Path) -> list[str]:
    """The ``cs336 fit`` arguments that name a run ``name``, where the config keeps a name.

    The name template is the ``logging.experiment_name`` or else the WandbLogger's ``name`` (experiment.py); setting
    the one the config does not use would be a disagreement, and adding a ``logging`` block to a config without one
    would switch the whole suite on, so the run is named through the config's own WandbLogger where it has one.
    """
    trainer = raw.get("trainer") if isinstance(raw.get("trainer"), dict) else {}
    logger = trainer.get("logger")
    block = raw.get("logging")
    if isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("WandbLogger"):
        # Without a save_dir of its own, jsonargparse fills in WandbLogger's default "." and cs336 fit keeps it: the
        # W&B files and Lightning's config.yaml (written into the first logger's save_dir) would land in the
        # working directory, every run's over the last one's. The run's own directory is where they belong.
        init = logger.get("init_args") if isinstance(logger.get("init_args"), dict) else {}
        return [f"--trainer.logger.init_args.name={name}"] + (
            [] if init.get("save_dir") else [f"--trainer.logger.init_args.save_dir={run_dir}"]
        )
    if isinstance(logger, list) and any(
        isinstance(e, dict) and str(e.get("class_path", "")).endswith("WandbLogger") for e in logger
    ):
        if not isinstance(block, dict):
            raise ValueError(
                "cannot name the ablation's runs: the config's trainer.logger is a list holding a WandbLogger and "
                "it has no logging block; use a single WandbLogger, or a logging: block"
            )
        return [f"--logging.experiment_name={name}"]
    if isinstance(block, dict):
        return [f"--logging.experiment_name={name}"]
    if isinstance(logger, list):
        raise ValueError(
            "cannot name the ablation's runs: the config has a list of loggers and no logging block or WandbLogger; "
            "add `logging: {}` or a WandbLogger to trainer.logger"
        )
    # No name anywhere: a bare WandbLogger entry carries it (cs336 fit adds one anyway unless W&B is off); its
    # save_dir must be given, since the entry's default (".") would put W&B's files into the working directory.
    return [
        "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
        f"--trainer.logger.init_args.name={name}",
        f"--trainer.logger.init_args.save_dir={run_dir}",
    ]


def find_record(parent: Path, name: str) -> Path | None:
    """The newest run record of run ``name`` in ``parent``: ``name-N`` with the largest N (cs336 fit's unique
    names), else ``name``; None if none has a ``run.json``."""
    if not parent.is_dir():
        return None
    pattern = re.compile(rf"^{re.escape(name)}(?:-(\d+))?$")
    found = []
    for path in parent.iterdir():
        match = pattern.match(path.name)
        if match and (path / "run.json").is_file():
            found.append((int(match.group(1) or 1), path))
    return max(found)[1] if found else None


def _next_name(parent: Path, name: str) -> str:
    """The name ``cs336 fit`` will give a run named ``name`` in ``parent`` (``name``, else ``name-2``, ...)."""
    from lightning_cs336.experiment import _unique

    return _unique(parent, name)


def _read_result(result: RunResult, path: Path, metric: str, mode: str) -> None:
    from lightning_cs336.runs import best, final, load_run

    run = load_run(path)
    result.path = path
    result.state = run.state
    result.final = final(run, metric)
    point = best(run, metric, mode)
    result.best, result.best_step = (point.value, point.step) if point else (None, None)


def _devices(jobs: int) -> list[str]:
    """The CUDA devices to spread concurrent jobs over (empty: leave CUDA_VISIBLE_DEVICES alone)."""
    if jobs < 2:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
    else:
        try:
            import torch

            devices = [str(i) for i in range(torch.cuda.device_count())]
        except Exception:  # noqa: BLE001 (no torch, no driver: no devices to spread over)
            devices = []
    return devices if len(devices) > 1 else []


@dataclass
class _Job:
    result: RunResult
    base: str
    """The run's name before cs336 fit's ``-N``: where its records are looked for."""
    env: dict[str, str]


def _launch(job: _Job, devices: queue.Queue[str] | None) -> None:
    """Run one ``cs336 fit`` process, its output into its log; a failure sets the result's state and error."""
    result = job.result
    device = devices.get() if devices is not None else None
    env = job.env if device is None else {**job.env, "CUDA_VISIBLE_DEVICES": device}
    try:
        assert result.log is not None
        result.log.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with open(result.log, "w", encoding="utf-8") as log:
            proc = subprocess.run(
                result.command, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL
            )
        result.seconds = round(time.monotonic() - start, 2)
        if proc.returncode != 0:
            result.state = "failed"
            result.error = _error_of(result.log.read_text(encoding="utf-8", errors="replace"), proc.returncode)
    finally:
        if device is not None and devices is not None:
            devices.put(device)


# --------------------------------------------------------------------------------------------------- outputs


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _summary_values(result: AblationResult) -> dict[str, Any]:
    done = [(row[0], row[3]) for row in result.rows if row[3] is not None]
    pick = min if result.mode == "min" else max
    best_variant = pick(done, key=lambda d: d[1]) if done else (None, None)
    return {
        "metric": result.metric,
        "mode": result.mode,
        "best_variant": best_variant[0],
        "best_final_mean": best_variant[1],
        "baseline_final_mean": result.rows[0][3] if result.rows else None,
        "runs": len(result.runs),
        "runs_finished": sum(r.state == "finished" for r in result.runs),
        "runs_failed": len(result.failed),
    }


def _record_summary(result: AblationResult, spec: dict[str, Any], out_dir: Path) -> Path:
    """The table as a run record of its own (``ablations/<ablation>/``), replacing an earlier ablation's."""
    from lightning_cs336.record import EVENTS_FILE, METRICS_FILE, RUN_FILE, RunRecord

    directory = out_dir / result.name
    for stale in (RUN_FILE, METRICS_FILE, EVENTS_FILE):  # a re-run's table replaces the last one (logs/ stay)
        (directory / stale).unlink(missing_ok=True)
    shutil.rmtree(directory / "wandb", ignore_errors=True)
    record = RunRecord(
        save_dir=out_dir, name=result.name, project=result.project, group=result.name, tags=["ablation-summary"]
    )
    record.update_identity(config=spec)
    record.log_table(TABLE_KEY, result.columns, result.rows)
    record.log_summary(_summary_values(result))
    record.finalize("success")
    return directory


def _wandb_summary(result: AblationResult, spec: dict[str, Any], entity: str | None, directory: Path) -> str | None:
    """A small W&B run ``<ablation>-summary`` in the ablation's group holding the table; why not, or None."""
    from lightning_cs336.callbacks.wandb_access import has_wandb_credentials
    from lightning_cs336.experiment import wandb_reachable

    mode = os.environ.get("WANDB_MODE") or ("online" if has_wandb_credentials() else "offline")
    if mode == "online" and not wandb_reachable()[0]:
        mode = "offline"  # as cs336 fit does: a summary that cannot upload is kept offline, not lost after 90 s
    try:
        import wandb

        run = wandb.init(
            project=result.project,
            entity=entity,
            group=result.name,
            name=f"{result.name}-summary",
            job_type="ablation-summary",
            tags=["ablation-summary"],
            config=spec,
            dir=str(directory),
            mode=mode,
        )
        run.log({TABLE_KEY: wandb.Table(columns=result.columns, data=result.rows, allow_mixed_types=True)})
        run.summary.update({k: v for k, v in _summary_values(result).items() if v is not None})
        run.finish()
    except Exception as err:  # noqa: BLE001 (the table is already on disk; W&B is a copy)
        return f"{type(err).__name__}: {err}"
    return None


def _html_report(result: AblationResult, path: Path) -> Path | None:
    """``<ablation>.html`` through :mod:`lightning_cs336.report`, where that module exists."""
    try:
        from lightning_cs336.report import write_report
    except ImportError:
        return None
    from lightning_cs336.runs import load_run

    runs = []
    for run in result.runs:
        if run.path is not None and run.path.is_dir():
            try:
                runs.append(load_run(run.path))
            except (OSError, ValueError):
                continue
    if not runs:
        return None
    ablation = [dict(zip(result.columns, row, strict=True)) for row in result.rows]
    return write_report(runs, path, title=f"Ablation {result.name}: {result.metric}", ablation=ablation)


# --------------------------------------------------------------------------------------------------- the ablation


def _check(
    config: Path,
    raw: dict[str, Any],
    varies: Sequence[tuple[str, Sequence[Any]]],
    extra_args: Sequence[str],
    jobs: int,
    ablation: str,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Parse the config with every key and value (``cs336 fit --print_config``) before anything runs: the baseline,
    then value ``i`` of every key at once (as few parses as there are values of the longest ``--vary``).

    Returns:
        The baseline's printed config (with the probe run name ``<ablation>.check``).

    Raises:
        ValueError: The first parse error, naming the variant; or if the config does not take the run name.
    """
    probe = f"{ablation}.check"
    width = max(len(values) for _, values in varies)
    checks = [Variant()] + [Variant(tuple((k, vs[min(i, len(vs) - 1)]) for k, vs in varies)) for i in range(width)]
    say(f"ablation {ablation}: checking the config and {sum(len(v) for _, v in varies)} value(s)")
    name_args = _name_args(raw, probe, Path(probe))
    with ThreadPoolExecutor(max_workers=min(jobs, len(checks))) as pool:
        futures = [
            pool.submit(_print_config, _fit_command(config, [*v.args(), *name_args, *extra_args])) for v in checks
        ]
    errors = []
    for variant, future in zip(checks, futures, strict=True):
        try:
            future.result()
        except ValueError as err:
            errors.append(f"{variant.label}: {err}" if variant.overrides else f"the config: {err}")
    if errors:
        raise ValueError(errors[0])
    dump = futures[0].result()
    records = _entries(dump, "logger", "RunRecord")
    if not records or (records[0].get("init_args") or {}).get("name") != probe:
        raise ValueError(f"cannot name the ablation's runs: `cs336 fit --config {config}` does not take the run name")
    return dump


def run_ablation(
    config: str | os.PathLike[str],
    vary: Sequence[str],
    seeds: Sequence[int] | None = None,
    jobs: int = 1,
    metric: str = "val/loss",
    mode: str = "min",
    name: str | None = None,
    extra_args: Sequence[str] = (),
    dry_run: bool = False,
    echo: Callable[[str], None] | None = None,
) -> AblationResult:
    """Run the baseline and every variant of the grid, for each seed, and tabulate ``metric``.

    Args:
        config: The base config (``cs336 fit --config``).
        vary: ``KEY=V1,V2,...`` specs; several make a grid.
        seeds: Seeds (``--seed_everything``) to run each variant with; None: the config's own seed.
        jobs: Runs at once (each its own process; with several CUDA devices each gets its own).
        metric: The metric to tabulate (its final and best value per run).
        mode: ``min`` or ``max``: which value of the metric is best.
        name: The ablation's name (group, run-name prefix, file names); default :func:`default_name`.
        extra_args: More ``cs336 fit`` arguments, for every run.
        dry_run: Plan only: validate, say which runs would run, launch nothing, write nothing.
        echo: Where progress lines go (default: stderr).

    Returns:
        The result (``exit_code`` 0 when every run finished).

    Raises:
        FileNotFoundError: If the config does not exist.
        ValueError: On bad input (a malformed ``--vary``, an unknown key or a bad value, bad seeds, jobs, mode), found
            before any run is launched.
    """
    say = echo or (lambda line: print(f"cs336: {line}", file=sys.stderr, flush=True))
    config = Path(config)
    if not config.is_file():
        raise FileNotFoundError(f"config {config} does not exist: pass --config PATH to a cs336 fit config")
    if mode not in ("min", "max"):
        raise ValueError(f"--mode must be min or max, got {mode!r}")
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    if not metric:
        raise ValueError("--metric must name a metric (e.g. val/loss)")
    for arg in extra_args:
        key = arg.removeprefix("--").split("=", 1)[0]
        if arg.startswith("--") and any(key == r or key.startswith(r + ".") for r in _RESERVED[1:]):
            raise ValueError(f"extra argument {arg!r}: the ablation names its runs itself (use --name)")
        if key in ("print_config", "config", "seed_everything", "ckpt_path"):
            raise ValueError(f"extra argument {arg!r} cannot be given to an ablation's runs")
    varies = [parse_vary(spec) for spec in vary]
    variants = expand_grid(varies)
    keys = [k for k, _ in varies]
    seed_list: list[int | None] = list(seeds) if seeds else [None]
    if len(set(seed_list)) != len(seed_list):
        raise ValueError("a seed is given twice")
    ablation = _sanitize(name) if name else default_name(config, keys)
    try:
        raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config {config} is not YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"config {config} is not a mapping of cs336 fit options")

    dump = _check(config, raw, varies, extra_args, jobs, ablation, say)
    records = _entries(dump, "logger", "RunRecord")
    record_args = records[0]["init_args"]
    parent = Path(record_args["save_dir"])
    project = record_args.get("project")
    wandb_entries = _entries(dump, "logger", "WandbLogger")
    entity = (wandb_entries[0].get("init_args") or {}).get("entity") if wandb_entries else None
    for ckpt in _entries(dump, "callbacks", "ModelCheckpoint"):
        dirpath = str((ckpt.get("init_args") or {}).get("dirpath") or "")
        if dirpath and not dirpath.startswith(str(parent / f"{ablation}.check")):
            say(f"warning: every run writes its checkpoints into {dirpath} (the config's ModelCheckpoint dirpath); "
                "remove it to give each run its own")  # fmt: skip
    if seeds is None:
        seed = dump.get("seed_everything")
        seed_list = [seed if isinstance(seed, int) and not isinstance(seed, bool) else None]

    # A variant whose values are the baseline's is the baseline: its row shares the baseline's runs. (Variants are
    # known by their index: a list value would make them unhashable.)
    same = [bool(v.overrides) and all(_lookup(dump, k) == (True, x) for k, x in v.overrides) for v in variants]
    out_dir = parent / "ablations"
    log_dir = out_dir / ablation / "logs"
    runs: dict[tuple[int, int | None], RunResult] = {}
    todo: list[_Job] = []
    names: dict[str, str] = {}
    for index, variant in enumerate(variants):
        if same[index]:
            continue
        tag = run_name("", variant, None, keys)[:64] if variant.overrides else BASELINE
        for seed in seed_list:
            base = run_name(ablation, variant, seed, keys)
            if base in names:
                raise ValueError(f"variants {names[base]!r} and {variant.label!r} get the same run name {base!r}")
            names[base] = variant.label
            result = runs[(index, seed)] = RunResult(variant.label, seed, base)
            existing = find_record(parent, base)
            if existing is not None:
                _read_result(result, existing, metric, mode)
                if result.state in ("finished", "running"):
                    result.skipped = True
                    result.name = existing.name
                    if result.state == "running":
                        result.error = f"still running elsewhere ({existing})"
                    continue
                # Failed, killed or preempted: run it again under the next free name (cs336 fit's own choice).
                result.state, result.path, result.final, result.best, result.best_step = ("pending",) + (None,) * 4
            result.name = _next_name(parent, base)
            args = [*variant.args(), *(["--seed_everything", str(seed)] if seed is not None else [])]
            result.command = _fit_command(config, [*args, *_name_args(raw, base, parent / result.name), *extra_args])
            result.log = log_dir / f"{result.name}.log"
            tags = [t.strip() for t in [*os.environ.get("WANDB_TAGS", "").split(","), "ablation", tag] if t.strip()]
            env = {**os.environ, "WANDB_RUN_GROUP": ablation, "WANDB_TAGS": ",".join(dict.fromkeys(tags))}
            todo.append(_Job(result, base, env))

    say(
        f"ablation {ablation}: {len(variants)} variant(s) x {len(seed_list)} seed(s) = {len(runs)} run(s) in "
        f"{parent}; {len(runs) - len(todo)} already finished (skipped), {len(todo)} to run, {jobs} at once"
    )
    if dry_run:
        for r in runs.values():
            say(f"  {'skip' if r.skipped else 'run '} {r.name}: {' '.join(r.command[2:]) if r.command else r.state}")
        return _result(ablation, project, parent, metric, mode, seed_list, variants, same, runs)

    devices = _devices(jobs)
    free: queue.Queue[str] | None = None
    if devices:
        free = queue.Queue()
        for i in range(jobs):
            free.put(devices[i % len(devices)])
        say(f"spreading the runs over CUDA devices {','.join(devices)}")
    lock = threading.Lock()
    done = itertools.count(1)

    def work(job: _Job) -> None:
        result = job.result
        started = time.time()
        _launch(job, free)
        record = find_record(parent, job.base)
        if record is not None:
            created = (json.loads((record / "run.json").read_text(encoding="utf-8")) or {}).get("created_at") or 0
            record = record if created >= started - 1 else None  # an older attempt's record is not this run's
        if record is not None:
            state, error = result.state, result.error
            _read_result(result, record, metric, mode)
            result.name = record.name
            if state == "failed":  # the process failed, whatever its record says (e.g. a crash after fit)
                result.state, result.error = "failed", error
            elif result.state != "finished":
                result.error = result.error or f"the run ended {result.state} with exit status 0"
        elif result.state != "failed":
            result.state, result.error = "failed", "the run exited 0 but left no run record"
        with lock:
            value = f", {metric} {_cell(result.final)}" if result.state == "finished" else f": {result.error}"
            say(f"[{next(done)}/{len(todo)}] {result.name} {result.state} in {result.seconds}s{value}")

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(work, job) for job in todo]:
            future.result()

    result = _result(ablation, project, parent, metric, mode, seed_list, variants, same, runs)
    spec = {
        "ablation": ablation,
        "config": str(config.resolve()),
        "vary": {k: v for k, v in varies},
        "seeds": seed_list,
        "metric": metric,
        "mode": mode,
        "extra_args": list(extra_args),
    }
    _write_outputs(result, spec, out_dir, entity if wandb_entries else None, wandb_on=bool(wandb_entries), say=say)
    return result


def _result(
    ablation: str,
    project: str | None,
    parent: Path,
    metric: str,
    mode: str,
    seeds: list[int | None],
    variants: list[Variant],
    same: list[bool],
    runs: dict[tuple[int, int | None], RunResult],
) -> AblationResult:
    groups = []
    for index, variant in enumerate(variants):
        source = 0 if same[index] else index
        label = f"{variant.label} (= baseline)" if same[index] else variant.label
        groups.append((label, [runs[(source, s)] for s in seeds if (source, s) in runs]))
    columns, rows, details = summarize(groups, metric)
    for index, (detail, variant) in enumerate(zip(details, variants, strict=True)):
        detail.update(overrides=dict(variant.overrides), same_as_baseline=same[index])
    head = f"ablation {ablation}: {metric} ({mode}) over seed(s) {', '.join(str(s) for s in seeds)}"
    text = head + "\n" + format_table(columns, rows)
    failed = [r for r in runs.values() if r.state != "finished"]
    if failed:
        text += "\nnot finished:\n" + "\n".join(f"  {r.name} ({r.state}): {r.error} [log: {r.log}]" for r in failed)
    return AblationResult(
        name=ablation,
        project=project,
        parent=parent,
        metric=metric,
        mode=mode,
        seeds=seeds,
        variants=details,
        runs=list(runs.values()),
        columns=columns,
        rows=rows,
        text=text,
    )


def _write_outputs(
    result: AblationResult,
    spec: dict[str, Any],
    out_dir: Path,
    entity: str | None,
    wandb_on: bool,
    say: Callable[[str], None],
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {
        **spec,
        "project": result.project,
        "parent": str(result.parent.resolve()),
        "created_at": time.time(),
        "columns": result.columns,
        "rows": result.rows,
        "variants": result.variants,
        "runs": [r.to_dict() for r in result.runs],
        "summary": _summary_values(result),
    }
    json_path = out_dir / f"{result.name}.json"
    _write_atomic(json_path, json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")
    md = [f"# Ablation `{result.name}`", "", f"{result.metric} ({result.mode}) over seed(s) "
          f"{', '.join(str(s) for s in result.seeds)}; config `{spec['config']}`.", "",
          format_markdown(result.columns, result.rows), ""]  # fmt: skip
    if result.failed:
        md += ["## Not finished", ""] + [f"- `{r.name}` ({r.state}): {r.error} (log `{r.log}`)" for r in result.failed]
    md_path = out_dir / f"{result.name}.md"
    _write_atomic(md_path, "\n".join(md) + "\n")
    result.files.update(json=json_path, md=md_path, record=_record_summary(result, spec, out_dir))
    if wandb_on:
        why = _wandb_summary(result, spec, entity, result.files["record"])
        if why:
            say(f"the W&B summary run failed ({why}); the table is in {json_path}")
    try:
        html = _html_report(result, out_dir / f"{result.name}.html")
    except (OSError, ValueError) as err:
        say(f"the HTML report failed ({err})")
        html = None
    if html is not None:
        result.files["html"] = html

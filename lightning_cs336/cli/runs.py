"""``cs336 runs``: list, rank, compare and plot past runs from what they left on disk (see :mod:`lightning_cs336.runs`).

Usage::

    cs336 runs list                                   # every run under runs/, oldest first
    cs336 runs list runs/cs336-basics --tag sweep --state finished --json
    cs336 runs best --metric val/loss --mode min      # the best run, its value, step and config
    cs336 runs compare lr0.01 lr0.1                   # config differences, then final/best metrics side by side
    cs336 runs plot --metric train/loss val/loss --out curves.png --smoothing 0.6 --x tokens
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from lightning_cs336 import runs as lib

DEFAULT_ROOT = "runs"
DEFAULT_METRICS = ("val/loss", "train/loss")


class _Parser(argparse.ArgumentParser):
    """Bad arguments raise ValueError, which ``cs336``'s main prints as one ``cs336: error: ...`` line (exit 2)."""

    def error(self, message: str) -> NoReturn:
        prog = self.prog.removeprefix("cs336 ")
        raise ValueError(f"{prog}: {message} (see `{self.prog} --help`)")


def _has_report() -> bool:
    # ``report`` is another module's; offer the subcommand only where it exists, so --help never lists a crash.
    return importlib.util.find_spec("lightning_cs336.report") is not None


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cs336 runs",
        description="Query past runs: run records (run.json), offline W&B runs (offline-run-*), CSVLogger dirs.",
        epilog="examples:" + __doc__.split("Usage::", 1)[1].rstrip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def paths(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "paths", nargs="*", default=[DEFAULT_ROOT], metavar="PATH", help="run dirs or dirs of runs (default: runs)"
        )

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tag", action="append", default=[], metavar="T", help="only runs with tag T (repeatable)")
        p.add_argument("--state", metavar="S", help="only runs in state S (finished, failed, killed, running...)")
        p.add_argument("--group", metavar="G", help="only runs of group G")

    p = sub.add_parser("list", help="a table of runs, oldest first")
    paths(p)
    filters(p)
    p.add_argument("--metric", metavar="KEY", help="metric of the final/best columns (default: val/loss)")
    p.add_argument("--json", action="store_true", help="machine-readable list")

    p = sub.add_parser("best", help="the best run by a metric, with its config")
    paths(p)
    filters(p)
    p.add_argument("--metric", default="val/loss", metavar="KEY", help="metric to rank by (default: val/loss)")
    p.add_argument("--mode", default="min", choices=("min", "max"), help="min (default) or max")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("compare", help="config differences and metrics of two or more runs")
    p.add_argument("runs", nargs="+", metavar="RUN", help="a run directory, or a run name found under --root")
    p.add_argument("--root", default=DEFAULT_ROOT, metavar="DIR", help="where run names are looked up (default: runs)")
    p.add_argument("--metric", nargs="+", metavar="KEY", help="metrics side by side (default: val/loss train/loss)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("plot", help="curves of runs, one subplot per metric")
    paths(p)
    filters(p)
    p.add_argument("--metric", nargs="+", metavar="KEY", help="metrics to plot (default: train/loss val/loss)")
    p.add_argument("--out", default="curves.png", metavar="FILE", help="image file (default: curves.png)")
    p.add_argument("--smoothing", type=float, default=0.0, metavar="W", help="EMA weight in [0, 1) as in W&B")
    p.add_argument("--x", default="step", choices=("step", "tokens"), help="x axis (default: step)")

    if _has_report():
        p = sub.add_parser("report", help="an HTML report of runs")
        p.add_argument("runs", nargs="+", metavar="RUN", help="a run directory, or a run name found under --root")
        p.add_argument("--root", default=DEFAULT_ROOT, metavar="DIR", help="where run names are looked up")
        p.add_argument("--out", default="report.html", metavar="FILE", help="output file (default: report.html)")
    return parser


# ------------------------------------------------------------------------------------------------------- helpers


def _discover(paths: Sequence[str]) -> list[lib.Run]:
    skipped: list[tuple[Path, str]] = []
    found = lib.discover_runs(paths, skipped=skipped)
    for directory, reason in skipped:
        print(f"cs336: skipped {directory}: {reason}", file=sys.stderr)
    if not found:
        raise ValueError(
            f"no runs found under {', '.join(paths)}: pass the directory holding run.json, wandb/offline-run-* or "
            "metrics.csv (train one with `cs336 fit`)"
        )
    return found


def _filtered(args: argparse.Namespace) -> list[lib.Run]:
    found = _discover(args.paths)
    chosen = lib.filter_runs(found, tags=args.tag, state=args.state, group=args.group)
    if not chosen:
        wanted = [f"--tag {t}" for t in args.tag] + [
            f"--{k} {v}" for k, v in (("state", args.state), ("group", args.group)) if v
        ]
        raise ValueError(
            f"no run matches {' '.join(wanted)} among the {len(found)} found; `cs336 runs list` shows their "
            "tags, states and groups"
        )
    return chosen


def _resolve(specs: Sequence[str], root: str) -> list[lib.Run]:
    """RUN arguments: a path (a run, or a directory of runs), else a run name (or ``project/name``) under ``root``."""
    chosen: list[lib.Run] = []
    pool: list[lib.Run] | None = None
    for spec in specs:
        if Path(spec).exists():
            chosen.extend(_discover([spec]))
            continue
        if pool is None:
            if not Path(root).is_dir():
                raise FileNotFoundError(f"{spec} is neither a path nor a run name: {root}/ does not exist")
            pool = lib.discover_runs([root], skipped=[])  # an unreadable neighbour must not hide the named run
        matches = [r for r in pool if spec in (r.name, f"{r.project}/{r.name}")]
        if not matches:
            names = ", ".join(sorted({r.name for r in pool})[:20]) or "none"
            raise ValueError(f"{spec} is neither a path nor a run name under {root}/ (names there: {names})")
        if len(matches) > 1:
            where = ", ".join(str(r.path) for r in matches)
            raise ValueError(f"run name {spec} is ambiguous under {root}/ ({where}): pass its path instead")
        chosen.extend(matches)
    return chosen


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.4g}"


def _count(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return str(value)


def _age(created_at: float | None, now: float) -> str:
    if created_at is None:
        return "-"
    seconds = max(0.0, now - created_at)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in (header, *rows)]
    return "\n".join(lines)


def _check_metric(runs: Sequence[lib.Run], metric: str) -> None:
    if not any(run.history.get(metric) or metric in run.summary for run in runs):
        known = sorted({k for r in runs for k in r.history})
        shown = ", ".join(known[:30]) + (", ..." if len(known) > 30 else "")
        raise ValueError(f"no run logged metric {metric!r}; metrics logged: {shown or 'none'}")


def _dump(value: Any) -> str:
    return json.dumps(value, indent=2, default=str, allow_nan=True)


def _yaml(config: dict[str, Any]) -> str:
    import yaml

    if not config:
        return "  (no config recorded)"
    text = yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=True, default_flow_style=False)
    return "\n".join("  " + line for line in text.rstrip().splitlines())


# ------------------------------------------------------------------------------------------------------ commands


def _list(args: argparse.Namespace) -> int:
    chosen = _filtered(args)
    metric = args.metric or "val/loss"
    if args.metric:
        _check_metric(chosen, metric)
    if args.json:
        out = []
        for run in chosen:
            point = lib.best(run, metric)
            out.append(
                {
                    **run.to_dict(),
                    "metric": metric,
                    "final": lib.final(run, metric),
                    "best": point.value if point else None,
                    "best_step": point.step if point else None,
                }
            )
        print(_dump(out))
        return 0
    now = time.time()
    rows = []
    for run in chosen:
        point = lib.best(run, metric)
        rows.append(
            [
                run.name,
                run.source,
                run.state,
                "-" if lib.steps(run) is None else str(lib.steps(run)),
                _fmt(lib.final(run, metric)),
                _fmt(point.value if point else None),
                _count(lib.tokens_seen(run)),
                ",".join(run.tags) or "-",
                _age(run.created_at, now),
            ]
        )
    header = ["name", "source", "state", "steps", f"final {metric}", f"best {metric}", "tokens", "tags", "age"]
    print(_table(header, rows))
    return 0


def _best(args: argparse.Namespace) -> int:
    chosen = _filtered(args)
    run = lib.best_run(chosen, args.metric, args.mode)
    point = lib.best(run, args.metric, args.mode)
    assert point is not None  # best_run only returns a run that logged the metric
    if args.json:
        print(
            _dump(
                {
                    "metric": args.metric,
                    "mode": args.mode,
                    "value": point.value,
                    "step": point.step,
                    "final": lib.final(run, args.metric),
                    "run": run.to_dict(),
                }
            )
        )
        return 0
    print(f"best run by {args.metric} ({args.mode}) of {len(chosen)}: {run.name}  [{run.source}, {run.state}]")
    print(f"  path:   {run.path}")
    print(f"  {args.metric} = {_fmt(point.value)} at step {point.step} (final {_fmt(lib.final(run, args.metric))})")
    print(f"  steps:  {lib.steps(run) or '-'}   tokens seen: {_count(lib.tokens_seen(run))}")
    # run_info holds the facts of where it ran (hardware, software, host), not settings: --json keeps them.
    config = {k: v for k, v in run.config.items() if k != "run_info"}
    print("config:" + (" (run_info facts omitted; --json has them)" if "run_info" in run.config else ""))
    print(_yaml(config))
    return 0


def _compare(args: argparse.Namespace) -> int:
    chosen = _resolve(args.runs, args.root)
    if len(chosen) < 2:
        raise ValueError(f"compare needs at least two runs, got {len(chosen)}: name two runs (or two run directories)")
    if args.metric is None:  # the defaults that some run logged; named metrics must exist
        args.metric = [m for m in DEFAULT_METRICS if any(r.history.get(m) for r in chosen)]
    for metric in args.metric:
        _check_metric(chosen, metric)
    diff = lib.config_diff(chosen)
    names = [r.name if [x.name for x in chosen].count(r.name) == 1 else str(r.path) for r in chosen]
    metrics: dict[str, list[dict[str, Any]]] = {}
    for metric in args.metric:
        metrics[metric] = []
        for run in chosen:
            point = lib.best(run, metric)
            metrics[metric].append(
                {
                    "final": lib.final(run, metric),
                    "best": point.value if point else None,
                    "best_step": point.step if point else None,
                }
            )
    if args.json:
        print(_dump({"runs": [r.to_dict() for r in chosen], "config_diff": diff, "metrics": metrics}))
        return 0
    if diff:
        print(f"config differences ({len(diff)} {'key' if len(diff) == 1 else 'keys'}):")
        rows = [[key, *(json.dumps(v, default=str) for v in values)] for key, values in diff.items()]
        print(_table(["  key", *names], [["  " + r[0], *r[1:]] for r in rows]))
    else:
        print("config: no differences (volatile keys such as hosts, paths and times are ignored)")
    print("metrics:")
    rows = []
    for metric, values in metrics.items():
        rows.append([f"  {metric} final", *(_fmt(v["final"]) for v in values)])
        rows.append(
            [
                f"  {metric} best",
                *(f"{_fmt(v['best'])} @{v['best_step']}" if v["best"] is not None else "-" for v in values),
            ]
        )
    rows.append(["  steps", *(str(lib.steps(r) or "-") for r in chosen)])
    rows.append(["  state", *(r.state for r in chosen)])
    print(_table(["  metric", *names], rows))
    return 0


def _plot(args: argparse.Namespace) -> int:
    chosen = _filtered(args)
    metrics = args.metric
    if metrics is None:  # the defaults that some run logged; named metrics must exist
        metrics = [m for m in ("train/loss", "val/loss") if any(r.history.get(m) for r in chosen)] or ["train/loss"]
    out = lib.plot_runs(chosen, metrics, args.out, smoothing=args.smoothing, x=args.x)
    print(f"wrote {out} ({', '.join(metrics)}; {len(chosen)} runs)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from lightning_cs336.report import write_report

    out = write_report(_resolve(args.runs, args.root), args.out)
    print(f"wrote {out}")
    return 0


def runs_main(argv: list[str] | None = None) -> int:
    """Command line for ``cs336 runs``.

    Args:
        argv: Arguments after ``runs`` (defaults to ``sys.argv[2:]``).

    Returns:
        0 on success (``--help`` too).

    Raises:
        ValueError: Bad arguments, no runs found, an unknown metric (``cs336``'s main prints one line, exit 2).
        FileNotFoundError: A path that does not exist (likewise).
    """
    parser = _parser()
    try:
        args = parser.parse_args(sys.argv[2:] if argv is None else argv)
    except SystemExit as e:  # only --help exits here (errors raise ValueError)
        return e.code if isinstance(e.code, int) else 0
    if args.command is None:
        commands = "list, best, compare, plot" + (", report" if _has_report() else "")
        raise ValueError(f"runs: choose a command: {commands} (see `cs336 runs --help`)")
    handler = {"list": _list, "best": _best, "compare": _compare, "plot": _plot, "report": _report}[args.command]
    return handler(args)

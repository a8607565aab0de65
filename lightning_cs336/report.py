"""A self-contained HTML report of runs: one file that opens from disk, with no server and no network.

What the page shows, for the runs given (see :func:`write_report`):

- interactive curves, one panel per group of keys that some run logged (:data:`PANELS`): loss, learning rate,
  gradient norm, memory, throughput. Hover shows each run's value and step, clicking a legend entry hides or shows
  a run (or a key), each panel has a linear/log y switch, and one slider sets the EMA smoothing (W&B's, debiased,
  as :func:`lightning_cs336.runs.ema`). The plotter is a small inline vanilla-JS SVG one
  (``report_assets/report.js``);
- an overview table (name, source, state, steps, final/best ``val/loss``, tokens, group, tags) and the config
  diff (only the keys whose values differ, :func:`lightning_cs336.runs.config_diff`);
- an ablation table, when rows are given (whatever columns they have);
- a sweep view, when the runs carry sweep parameters (``cs336 sweep`` trials: summary ``sweep/params``) or
  ``sweep=`` is given: a parallel-coordinates plot of every parameter against the metric (one line per trial,
  colored by the metric, pruned trials dashed, failed ones grey; hover names the trial) and the trials' table;
- each run's text samples (table ``samples/generations``) grouped by step in collapsible ``<details>``;
- each run's checkpoints (step, path, monitor, score).

Size: each series is downsampled to about :data:`MAX_POINTS` points (:func:`downsample`: the lowest and highest
value of each bucket of consecutive points, so spikes survive; a NaN/inf too), values are kept to 7 significant
digits, and the JSON is compact. The smoothing slider smooths what was kept, so on a downsampled series it is an
approximation of the EMA of every point.

Safety: every string reaches the page escaped (``html.escape`` in tables; ``textContent`` in the script), and the
data is embedded as JSON with ``<``, ``>`` and ``&`` written as ``\\u003c``, ``\\u003e``, ``\\u0026``, so a sample
holding ``</script>`` cannot end the script early; NaN and inf become ``null``.

Example::

    from lightning_cs336.report import write_report
    from lightning_cs336.runs import discover_runs

    write_report(discover_runs(["runs/cs336-basics"]), "report.html", title="LR sweep")

or ``cs336 runs report runs/cs336-basics --out report.html``.
"""

from __future__ import annotations

import fnmatch
import html
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from lightning_cs336.runs import Run, best, config_diff, final, steps, tokens_seen

__all__ = ["MAX_POINTS", "PANELS", "SAMPLES_TABLE", "downsample", "render_report", "sweep_rows", "write_report"]

#: About how many points each series keeps in the page (see :func:`downsample`).
MAX_POINTS = 2000
#: The curve panels: title and the metric keys it draws (``fnmatch`` patterns). A panel no run has a key of is left
#: out.
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Loss", ("train/loss", "val/loss")),
    ("Learning rate", ("lr-*",)),
    ("Gradient norm", ("grad/norm_total",)),
    ("Memory (GiB)", ("memory/*_gib",)),
    ("Throughput (tokens/s)", ("throughput/tokens_per_sec",)),
)
#: The table of text samples (TextSampleLogger's); a prefixed one (``ft/samples/generations``) counts too.
SAMPLES_TABLE = "samples/generations"
_PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
_STATES = ("running", "finished", "failed", "killed", "preempted", "unknown")
_ASSETS = "report_assets"


# ------------------------------------------------------------------------------------------------------ values


def downsample(points: Sequence[tuple[int, float]], max_points: int = MAX_POINTS) -> list[tuple[int, float]]:
    """About ``max_points`` of ``points``, in order: the series cut into ``max_points // 2`` buckets of consecutive
    points, and of each the lowest and the highest finite value (so spikes and dips survive), plus its first
    non-finite point if it has one (a divergence stays visible), plus the first and last point of the series.
    Series no longer than ``max_points`` come back whole."""
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2, got {max_points}")
    if len(points) <= max_points:
        return list(points)
    buckets = max_points // 2
    size = len(points) / buckets
    keep = {0, len(points) - 1}
    for b in range(buckets):
        chunk = range(int(b * size), min(int((b + 1) * size), len(points)))
        finite = [i for i in chunk if math.isfinite(points[i][1])]
        if finite:
            keep.add(min(finite, key=lambda i: points[i][1]))
            keep.add(max(finite, key=lambda i: points[i][1]))
        bad = next((i for i in chunk if not math.isfinite(points[i][1])), None)
        if bad is not None:
            keep.add(bad)
    return [points[i] for i in sorted(keep)]


def _num(value: float) -> float | None:
    """A JSON number with 7 significant digits, or None for NaN/inf."""
    return float(f"{value:.7g}") if math.isfinite(value) else None


def _clean(value: Any) -> Any:
    """A JSON-safe copy: non-finite floats as None, tuples as lists, anything unknown as its ``str``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return str(value)


def _script_json(data: Any) -> str:
    """``data`` as compact JSON that is safe inside ``<script>``: no ``<``, ``>`` or ``&`` characters remain."""
    text = json.dumps(_clean(data), separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _text(value: Any) -> str:
    """A table cell's text (not yet escaped)."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        return f"{value:.6g}" if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(_clean(value), ensure_ascii=False)
    return str(value)


def _esc(value: Any) -> str:
    return html.escape(_text(value), quote=True)


def _count(value: int | None) -> str:
    if value is None:
        return "–"
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return str(value)


def _labels(runs: Sequence[Run]) -> list[str]:
    """A distinct label per run: its name, with its position where two runs share a name."""
    names = [r.name for r in runs]
    return [n if names.count(n) == 1 else f"{n} (#{i + 1})" for i, n in enumerate(names)]


# -------------------------------------------------------------------------------------------------------- data


def _panel_keys(runs: Sequence[Run], patterns: Sequence[str]) -> list[str]:
    logged = sorted({k for r in runs for k, points in r.history.items() if points})
    keys: list[str] = []
    for pattern in patterns:
        keys.extend(k for k in logged if fnmatch.fnmatchcase(k, pattern) and k not in keys)
    return keys


def _series(points: Sequence[tuple[int, float]], max_points: int) -> dict[str, list[Any]]:
    ordered = sorted(points, key=lambda p: p[0])  # stable: a step logged twice keeps its logging order
    kept = downsample(ordered, max_points)
    return {"x": [int(s) for s, _ in kept], "y": [_num(float(v)) for _, v in kept], "n": len(points)}


def _plot_data(runs: Sequence[Run], labels: Sequence[str], max_points: int) -> dict[str, Any]:
    panels = []
    for title, patterns in PANELS:
        keys = _panel_keys(runs, patterns)
        if not keys:
            continue
        series = [
            {"run": i, "key": key, **_series(run.history[key], max_points)}
            for key in keys
            for i, run in enumerate(runs)
            if run.history.get(key)
        ]
        panels.append({"title": title, "keys": keys, "series": series})
    meta = [{"label": label, "color": _PALETTE[i % len(_PALETTE)]} for i, label in enumerate(labels)]
    return {"runs": meta, "panels": panels}


# -------------------------------------------------------------------------------------------------------- html


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """An HTML table; ``header`` is plain text (escaped here), ``rows`` hold cells that are already HTML."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _swatch(color: str) -> str:
    return f'<span class="swatch" style="background:{color}"></span>'


def _overview(runs: Sequence[Run], labels: Sequence[str]) -> str:
    rows = []
    for i, run in enumerate(runs):
        point = best(run, "val/loss")
        state = run.state if run.state in _STATES else "unknown"
        rows.append(
            [
                _swatch(_PALETTE[i % len(_PALETTE)]) + _esc(labels[i]),
                _esc(run.source),
                f'<span class="state state-{state}">{_esc(run.state)}</span>',
                _esc(steps(run)),
                _esc(final(run, "val/loss")),
                f"{_esc(point.value)} <small>@{point.step}</small>" if point else "–",
                _esc(_count(tokens_seen(run))),
                _esc(run.group),
                " ".join(f'<span class="tag">{_esc(t)}</span>' for t in run.tags) or "–",
            ]
        )
    header = ["run", "source", "state", "steps", "final val/loss", "best val/loss", "tokens", "group", "tags"]
    return _table(header, rows, "overview")


def _config(runs: Sequence[Run], labels: Sequence[str]) -> str:
    if len(runs) < 2:
        return '<p class="muted">One run: nothing to compare.</p>'
    diff = config_diff(runs)
    if not diff:
        return '<p class="muted">No differences (volatile keys such as hosts, paths and times are ignored).</p>'
    rows = [[f"<code>{_esc(key)}</code>", *(_esc(v) for v in values)] for key, values in diff.items()]
    note = f'<p class="muted">{len(diff)} {"key differs" if len(diff) == 1 else "keys differ"}.</p>'
    return note + _table(["key", *labels], rows, "config")


def _ablation(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return '<p class="muted">No ablation rows.</p>'
    columns = list(dict.fromkeys(k for row in rows for k in row))
    body = [[_esc(row.get(c)) for c in columns] for row in rows]
    return _table(columns, body, "ablation")


def sweep_rows(runs: Sequence[Run]) -> dict[str, Any] | None:
    """The sweep view's data from runs that carry sweep parameters (summary ``sweep/params``, as
    :class:`lightning_cs336.sweep.OptunaPruning` writes it), or None when none does."""
    rows = []
    metric = None
    for run in runs:
        params = run.summary.get("sweep/params")
        if not isinstance(params, dict):
            continue
        metric = metric or run.summary.get("sweep/metric")
        state = run.summary.get("sweep/state")
        if state in (None, "running"):
            state = "fail" if run.state in ("failed", "killed", "preempted") else run.state
        value = run.summary.get("sweep/value")
        if not _is_number(value):
            value = final(run, metric) if metric and state != "fail" else None
        trial = run.summary.get("sweep/trial")
        rows.append({"label": f"trial-{trial}" if trial is not None else run.name, "run": run.name, "state": state,
                     "params": params, "value": value, "step": run.summary.get("sweep/pruned_step")})  # fmt: skip
    if not rows:
        return None
    return {"metric": metric or "val/loss", "mode": "min", "rows": rows}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sweep_data(runs: Sequence[Run], sweep: Mapping[str, Any]) -> dict[str, Any]:
    """The parallel-coordinates data: one axis per parameter (numeric, log where positive and spanning 20x or more;
    else categorical) and the metric's, one row per trial (``run``: the index of its run in the page, or None)."""
    index = {run.name: i for i, run in enumerate(runs)}
    rows = list(sweep.get("rows") or [])
    keys = list(dict.fromkeys(k for r in rows for k in (r.get("params") or {})))
    axes = []
    for key in keys:
        values = [r["params"][key] for r in rows if key in (r.get("params") or {})]
        if values and all(_is_number(v) for v in values):
            low, high = min(values), max(values)
            axes.append({"name": key, "kind": "number", "log": bool(low > 0 and high / low >= 20)})
        else:
            choices = list(dict.fromkeys(_text(v) for v in values))
            axes.append({"name": key, "kind": "category", "choices": choices})
    out_rows = []
    for r in rows:
        params = r.get("params") or {}
        values = [(params[k] if _is_number(params[k]) else _text(params[k])) if k in params else None for k in keys]
        value = r.get("value")
        out_rows.append({"label": str(r.get("label")), "run": index.get(r.get("run")), "state": str(r.get("state")),
                         "values": values, "value": value if _is_number(value) else None,
                         "step": r.get("step")})  # fmt: skip
    return {"metric": str(sweep.get("metric") or "metric"), "mode": sweep.get("mode") or "min", "axes": axes,
            "rows": out_rows}  # fmt: skip


def _sweep_section(data: Mapping[str, Any], labels: Sequence[str]) -> str:
    names = [a["name"] for a in data["axes"]]
    body = []
    for r in data["rows"]:
        state = r["state"] + (f" @{r['step']}" if r.get("step") is not None else "")
        run = _esc(labels[r["run"]]) if r["run"] is not None else "–"
        body.append([_esc(r["label"]), f'<span class="state state-{_esc(r["state"])}">{_esc(state)}</span>',
                     _esc(r["value"]), *(_esc(v) for v in r["values"]), run])  # fmt: skip
    plot = (
        '<div id="sweep-plot" class="chart"></div><noscript><p class="muted">The plot needs JavaScript.</p></noscript>'
        f'<p class="muted">{len(data["rows"])} trial(s): one line each through the parameters to '
        f"{html.escape(data['metric'])}; darker is better; pruned dashed, failed grey.</p>"
    )
    return plot + _table(["trial", "state", data["metric"], *names, "run"], body, "sweep")


def _samples(run: Run) -> str:
    parts = []
    for key in sorted(k for k in run.tables if k == SAMPLES_TABLE or k.endswith("/" + SAMPLES_TABLE)):
        columns, rows = run.tables[key]
        columns = [str(c) for c in columns]
        if not rows:
            continue
        at = columns.index("step") if "step" in columns else None
        shown = [i for i in range(len(columns)) if i != at]
        groups: dict[Any, list[Sequence[Any]]] = {}
        for row in rows:
            groups.setdefault(row[at] if at is not None and at < len(row) else None, []).append(row)
        title = f"<h4>{_esc(key)}</h4>" if key != SAMPLES_TABLE else ""
        blocks = []
        for n, (step, group) in enumerate(reversed(list(groups.items()))):  # newest first, and open
            cells = [
                [f'<div class="text">{_esc(row[i])}</div>' if i < len(row) else "" for i in shown] for row in group
            ]
            label = "step " + _esc(step) if at is not None else "samples"
            count = f"{len(group)} sample{'s' if len(group) != 1 else ''}"
            blocks.append(
                f"<details{' open' if n == 0 else ''}><summary>{label} <small>({count})</small></summary>"
                + _table([columns[i] for i in shown], cells, "samples")
                + "</details>"
            )
        parts.append(title + "".join(blocks))
    return "".join(parts)


def _checkpoints(run: Run) -> str:
    if not run.checkpoints:
        return ""
    rows = [[_esc(c.get(k)) for k in ("step", "path", "monitor", "score")] for c in run.checkpoints]
    return _table(["step", "path", "monitor", "score"], rows, "checkpoints")


def _per_run(runs: Sequence[Run], labels: Sequence[str], part: Callable[[Run], str], empty: str) -> str:
    sections = []
    for i, run in enumerate(runs):
        body = part(run)
        if body:
            sections.append(f"<h3>{_swatch(_PALETTE[i % len(_PALETTE)])}{_esc(labels[i])}</h3>{body}")
    return "".join(sections) or f'<p class="muted">{html.escape(empty)}</p>'


def _asset(name: str) -> str:
    text = resources.files(__package__).joinpath(_ASSETS, name).read_text(encoding="utf-8")
    closing = "</script" if name.endswith(".js") else "</style"
    if closing in text.lower():
        raise ValueError(f"{_ASSETS}/{name} must not contain {closing!r}: it is inlined into the page")
    return text


def render_report(
    runs: Sequence[Run],
    title: str | None = None,
    ablation: Sequence[Mapping[str, Any]] | None = None,
    max_points: int = MAX_POINTS,
    sweep: Mapping[str, Any] | None = None,
) -> str:
    """The report page of :func:`write_report` as a string (see the module docstring)."""
    runs = list(runs)
    if not runs:
        raise ValueError("no runs to report on: pass at least one Run")
    labels = _labels(runs)
    title = title or f"Run report: {len(runs)} run{'s' if len(runs) != 1 else ''}"
    plot = _plot_data(runs, labels, max_points)
    sweep = sweep if sweep is not None else sweep_rows(runs)
    if sweep is not None and sweep.get("rows"):
        plot["sweep"] = _sweep_data(runs, sweep)
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    curves = (
        '<div class="controls"><label>smoothing <input id="smoothing" type="range" min="0" max="0.99" step="0.01" '
        'value="0"> <output id="smoothing-value">0</output></label> <span class="muted">hover for values; click a '
        "legend entry to hide or show it</span></div>"
        '<div id="charts"></div><noscript><p class="muted">The curves need JavaScript.</p></noscript>'
        if plot["panels"]
        else '<p class="muted">No run logged loss, learning rate, gradient norm, memory or throughput.</p>'
    )
    sections = [
        ("overview", "Runs", _overview(runs, labels)),
        ("curves", "Curves", curves),
        ("config", "Config differences", _config(runs, labels)),
    ]
    if ablation is not None:
        sections.append(("ablation", "Ablation", _ablation(list(ablation))))
    if "sweep" in plot:
        sections.append(("sweep", "Sweep", _sweep_section(plot["sweep"], labels)))
    sections.append(("samples", "Text samples", _per_run(runs, labels, _samples, "No run logged text samples.")))
    sections.append(("checkpoints", "Checkpoints", _per_run(runs, labels, _checkpoints, "No checkpoints recorded.")))
    nav = " · ".join(f'<a href="#{sid}">{html.escape(name)}</a>' for sid, name, _ in sections)
    body = "".join(
        f'<section id="{sid}"><h2>{html.escape(name)}</h2>{content}</section>' for sid, name, content in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_asset('report.css')}</style></head><body>"
        # First, so an error anywhere below is recorded (the tests read it from the DOM).
        "<script>window.onerror=function(m){document.body.dataset.jsError=String(m);};</script>"
        f'<header><h1>{html.escape(title)}</h1><p class="muted">{len(runs)} run{"s" if len(runs) != 1 else ""}'
        f" · generated {html.escape(generated)} · {nav}</p></header><main>{body}</main>"
        f'<script type="application/json" id="report-data">{_script_json(plot)}</script>'
        f"<script>{_asset('report.js')}</script></body></html>\n"
    )


def write_report(
    runs: Sequence[Run],
    out: str | os.PathLike[str],
    title: str | None = None,
    ablation: Sequence[Mapping[str, Any]] | None = None,
    sweep: Mapping[str, Any] | None = None,
) -> Path:
    """Write a self-contained HTML report of ``runs`` (no server, no network; see the module docstring).

    Args:
        runs: The runs, in the order they are shown (each gets one color).
        out: The HTML file to write (its directory is created). Written atomically: a temporary file in the same
            directory, then renamed, so a failed render leaves no partial file.
        title: The page title (default ``Run report: N runs``).
        ablation: Rows of an ablation table (e.g. ``{"variant": "model.num_heads=8", "seed": 0, "val/loss": 3.1,
            "delta": -0.05}``), shown with whatever columns they have; None: no ablation section.
        sweep: The sweep view: ``{"metric": "val/loss", "mode": "min", "rows": [{"label": "trial-3", "run": <run
            name>, "state": "pruned", "params": {"model.max_lr": 0.001}, "value": 3.2, "step": 40}]}``; None: taken
            from the runs' ``sweep/*`` summaries where they have them (:func:`sweep_rows`).

    Returns:
        The path written.

    Raises:
        ValueError: If ``runs`` is empty.
    """
    text = render_report(runs, title=title, ablation=ablation, sweep=sweep)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the report private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

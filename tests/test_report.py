"""``lightning_cs336.report``: the self-contained HTML report, checked statically and in a real headless Chromium
(the page's script must render without errors and draw SVG curves; a screenshot must not be blank), and through
``cs336 runs report`` on runs a real Trainer wrote."""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from lightning_cs336.report import MAX_POINTS, downsample, render_report, write_report
from lightning_cs336.runs import Run

CHROMIUM = "/usr/bin/chromium"
EVIL = "</script><b>x</b>"
ABLATION = [
    {"variant": "baseline", "seed": 0, "val/loss": 3.15, "delta": 0.0},
    {"variant": "model.num_heads=8", "seed": 0, "val/loss": 3.1, "delta": -0.05},
    {"variant": "model.d_model=<256>", "seed": 1, "val/loss": float("nan"), "delta": None, "note": "diverged & <b>"},
]


def _run(name: str, lr: float, heads: int, n: int = 300, nan_at: int | None = None) -> Run:
    tau, floor = 30 + 2e4 * lr, 2 + 50 * lr
    history: dict[str, list[tuple[int, float]]] = {
        "train/loss": [(s, 5.0 * math.exp(-s / tau) + floor + 0.05 * math.sin(s)) for s in range(1, n + 1)],
        "val/loss": [(s, 4.0 * math.exp(-s / tau) + floor + 0.2) for s in range(50, n + 1, 50)],
        "lr-AdamW": [(s, lr * min(1.0, s / 30) * (0.5 + 0.5 * math.cos(math.pi * s / n))) for s in range(1, n + 1)],
        "grad/norm_total": [(s, 1.0 + 3.0 / (1 + s / 20)) for s in range(1, n + 1)],
        "memory/rss_gib": [(s, 1.0 + 0.05 * heads + 0.001 * s) for s in range(1, n + 1, 5)],
        "memory/peak_allocated_gib": [(s, 0.8) for s in range(1, n + 1, 5)],
        "throughput/tokens_per_sec": [(s, 1e4 + 2e6 * lr + 500 * math.sin(s / 10)) for s in range(2, n + 1)],
        "train/other": [(s, 1.0) for s in range(1, n + 1)],
    }
    if nan_at is not None:
        history["train/loss"][nan_at] = (history["train/loss"][nan_at][0], float("nan"))
    columns = ["step", "prompt", "generation", "temperature"]
    rows = [[s, f"Once upon a time ({name})", f"gen {s} of {name}", 0.8] for s in (100, 200, 300) for _ in range(2)]
    if nan_at is not None:
        rows.append([300, "evil prompt", EVIL, 0.8])
    return Run(
        name=name,
        source="record",
        path=Path(f"/runs/{name}"),
        state="finished" if nan_at is None else "failed",
        config={"model": {"d_model": 64, "num_heads": heads}, "optimizer": {"lr": lr}, "seed": 0},
        tags=["sweep", f"lr={lr}"],
        group="sweep",
        history=history,
        summary={"summary/tokens_seen": n * 4096, "summary/global_step": n},
        tables={"samples/generations": (columns, rows)},
        checkpoints=[
            {"step": 150, "path": f"/ckpt/{name}/step150.ckpt", "monitor": "val/loss", "score": 2.9},
            {"step": n, "path": f"/ckpt/{name}/last.ckpt", "monitor": "val/loss", "score": 2.5},
        ],
    )


@pytest.fixture(scope="module")
def runs() -> list[Run]:
    return [_run("lr3e-4-h4", 3e-4, 4), _run("lr1e-3-h8", 1e-3, 8, nan_at=120), _run("lr3e-3-h4", 3e-3, 4, n=250)]


@pytest.fixture(scope="module")
def report(runs: list[Run], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "sub" / "report.html"
    assert write_report(runs, out, title="Sweep <lr> & heads", ablation=ABLATION) == out
    return out


def _data(text: str) -> dict[str, Any]:
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S)
    assert match, "no embedded data"
    return json.loads(match.group(1))


# ------------------------------------------------------------------------------------------------------ static


def test_self_contained_and_escaped(report: Path, runs: list[Run]) -> None:
    text = report.read_text(encoding="utf-8")
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text, re.I), "external resource"
    assert not re.search(r"@import|url\(\s*['\"]?(?:https?:)?//", text, re.I)
    # The sample holding </script> is escaped in the table, and the page has exactly its own two scripts' ends
    # (onerror handler, data, plotter).
    assert EVIL not in text
    assert html.escape(EVIL) in text
    assert text.lower().count("</script>") == 3
    assert "Sweep &lt;lr&gt; &amp; heads" in text
    assert "model.d_model=&lt;256&gt;" in text and "diverged &amp; &lt;b&gt;" in text
    data_text = re.search(r'id="report-data">(.*?)</script>', text, re.S).group(1)
    assert not set("<>&") & set(data_text)


def test_embedded_json_round_trips(report: Path, runs: list[Run]) -> None:
    data = _data(report.read_text(encoding="utf-8"))
    assert [r["label"] for r in data["runs"]] == [r.name for r in runs]
    titles = [p["title"] for p in data["panels"]]
    assert titles == ["Loss", "Learning rate", "Gradient norm", "Memory (GiB)", "Throughput (tokens/s)"]
    loss = data["panels"][0]
    assert loss["keys"] == ["train/loss", "val/loss"]
    memory = data["panels"][3]
    assert memory["keys"] == ["memory/peak_allocated_gib", "memory/rss_gib"]
    series = {(s["run"], s["key"]): s for p in data["panels"] for s in p["series"]}
    assert "train/other" not in {k for _, k in series}
    s = series[(1, "train/loss")]
    assert s["x"] == [p[0] for p in runs[1].history["train/loss"]]
    assert s["y"][120] is None  # NaN -> null
    for got, (_, want) in zip(s["y"], runs[1].history["train/loss"], strict=True):
        assert got is None or math.isclose(got, want, rel_tol=1e-6)


def test_tables(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    overview = text.split('<table class="overview">', 1)[1].split("</table>", 1)[0]
    assert overview.count("<tr>") == 4 and "lr1e-3-h8" in overview and "failed" in overview
    assert "1.2M" in overview  # tokens 300 * 4096
    config = text.split('<table class="config">', 1)[1].split("</table>", 1)[0]
    assert "model.num_heads" in config and "optimizer.lr" in config
    assert "model.d_model" not in config and "seed" not in config  # equal in every run
    ablation = text.split('<table class="ablation">', 1)[1].split("</table>", 1)[0]
    for column in ("variant", "seed", "val/loss", "delta", "note"):
        assert f"<th>{html.escape(column)}</th>" in ablation
    assert "-0.05" in ablation and "NaN" in ablation
    samples = text.split('<section id="samples">', 1)[1].split("</section>", 1)[0]
    assert samples.count("<details") == 9 and samples.count("<details open>") == 3
    assert "step 300" in samples and "gen 200 of lr3e-3-h4" in samples
    checkpoints = text.split('<section id="checkpoints">', 1)[1].split("</section>", 1)[0]
    assert checkpoints.count("/ckpt/") == 6 and "step150.ckpt" in checkpoints and "val/loss" in checkpoints


def test_only_panels_that_exist_and_no_ablation(tmp_path: Path) -> None:
    run = Run(name="tiny", source="csv", history={"train/loss": [(0, 1.0), (1, 0.5)]})
    text = write_report([run], tmp_path / "r.html").read_text(encoding="utf-8")
    assert [p["title"] for p in _data(text)["panels"]] == ["Loss"]
    assert 'id="ablation"' not in text and "No run logged text samples" in text and "nothing to compare" in text
    with pytest.raises(ValueError, match="no runs"):
        write_report([], tmp_path / "empty.html")
    assert not (tmp_path / "empty.html").exists()


def test_failed_render_or_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_cs336.report as report_module

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "r.html"
    out.write_text("old")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    # Rendering fails; then the rename fails, after the temporary file was written.
    for target, name in ((report_module, "render_report"), (report_module.os, "replace")):
        with monkeypatch.context() as mp:
            mp.setattr(target, name, broken)
            with pytest.raises(RuntimeError):
                write_report([Run(name="x", source="csv")], out)
        assert out.read_text() == "old" and [p.name for p in out_dir.iterdir()] == ["r.html"]


def test_downsample_keeps_extremes_and_nan() -> None:
    points = [(i, math.sin(i / 50)) for i in range(100_000)]
    points[5000] = (5000, 100.0)
    points[7000] = (7000, -100.0)
    points[9000] = (9000, float("nan"))
    kept = downsample(points)
    assert len(kept) <= MAX_POINTS + 3
    assert kept[0] == points[0] and kept[-1] == points[-1]
    assert (5000, 100.0) in kept and (7000, -100.0) in kept
    assert any(s == 9000 and math.isnan(v) for s, v in kept)
    assert [s for s, _ in kept] == sorted(s for s, _ in kept)
    assert downsample(points[:10]) == points[:10]
    run = Run(name="long", source="csv", history={"train/loss": points})
    text = render_report([run])
    assert len(_data(text)["panels"][0]["series"][0]["x"]) == len(kept)
    assert len(text) < 200_000


# ----------------------------------------------------------------------------------------------------- browser


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed")
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)  # a fresh profile for every call
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *args,
    ]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    dom = _chromium(tmp_path, "--window-size=1280,2400", "--dump-dom", report.as_uri()).stdout
    assert 'data-rendered="ok"' in dom, dom[-2000:]
    assert "data-js-error" not in dom
    assert dom.count('class="chart"') == 5
    paths = re.findall(r'<path class="line" d="M[\d.]+ [\d.]+L[^"]+"[^>]*data-run="(\d)"[^>]*data-key="([^"]+)"', dom)
    assert {k for _, k in paths} >= {"train/loss", "lr-AdamW", "grad/norm_total", "memory/rss_gib"}
    assert {r for r, _ in paths} == {"0", "1", "2"}
    # The NaN at step 120 breaks run 1's train/loss line into two pieces.
    broken = re.search(r'<path class="line" d="([^"]+)"[^>]*data-run="1"[^>]*data-key="train/loss"', dom)
    assert broken and broken.group(1).count("M") == 2
    assert "lr1e-3-h8" in dom


def test_screenshot_is_not_blank(report: Path, tmp_path: Path) -> None:
    import matplotlib.image

    shot = tmp_path / "report.png"
    _chromium(tmp_path, "--window-size=1280,2400", f"--screenshot={shot}", report.as_uri())
    image = matplotlib.image.imread(shot)[..., :3]
    assert image.shape[:2] == (2400, 1280)
    not_white = (image < 0.95).any(axis=-1).mean()
    assert not_white > 0.03, not_white
    assert image.var() > 0
    # Curves are drawn in the run colors: some pixels are the first run's blue (#1f77b4).
    blue = (abs(image - [0x1F / 255, 0x77 / 255, 0xB4 / 255]) < 0.08).all(axis=-1).sum()
    assert blue > 200, blue


PROBE = """<script>(function () {
  var out = {}, chart = document.querySelector(".chart"), svg = chart.querySelector("svg");
  var r = svg.getBoundingClientRect(), ticks = function () {
    return Array.prototype.map.call(chart.querySelectorAll("svg text"), function (t) { return t.textContent; });
  };
  svg.dispatchEvent(new MouseEvent("mousemove", { clientX: r.left + r.width / 2, clientY: r.top + 60, bubbles: true }));
  out.tip = chart.querySelector(".tooltip").textContent;
  out.tipShown = chart.querySelector(".tooltip").style.display;
  var count = function (run) { return document.querySelectorAll('path.line[data-run="' + run + '"]').length; };
  out.before = count(0);
  chart.querySelector(".legend span").click();
  out.hidden = count(0);
  out.legendOff = chart.querySelector(".legend span").className;
  chart.querySelector(".legend span").click();
  out.again = count(0);
  out.linear = ticks();
  chart.querySelector("input[type=checkbox]").click();
  out.log = ticks();
  var slider = document.getElementById("smoothing");
  slider.value = "0.9";
  slider.dispatchEvent(new Event("input"));
  out.raw = document.querySelectorAll("path.raw").length;
  out.smoothing = document.getElementById("smoothing-value").textContent;
  document.body.dataset.probe = JSON.stringify(out);
})();</script>"""


def test_interactions_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    """Hover shows a tooltip, a legend click hides a run in every panel (and a second shows it), log y changes the
    ticks, the smoothing slider draws smoothed lines over faint raw ones; no script error on the way."""
    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = _chromium(tmp_path, "--window-size=1280,2400", "--dump-dom", probed.as_uri()).stdout
    assert "data-js-error" not in dom, re.search(r'data-js-error="([^"]*)"', dom)
    out = json.loads(html.unescape(re.search(r'data-probe="([^"]*)"', dom).group(1)))
    assert out["tipShown"] == "block"
    at = int(re.search(r"step ≈ (\d+)", out["tip"]).group(1))
    assert 100 < at < 200, out["tip"]  # the middle of the svg is right of the plot's middle (the y labels)
    assert "lr3e-4-h4 · train/loss: " in out["tip"] and f"@ {at}" in out["tip"] and "lr3e-3-h4 · val/loss" in out["tip"]
    assert out["before"] == 7 and out["hidden"] == 0 and out["again"] == 7 and out["legendOff"] == "off"
    assert out["linear"] != out["log"]
    assert out["raw"] > 0 and out["smoothing"] == "0.90"


def _fit(root: Path, name: str, lr: float) -> None:
    from callback_helpers import TinyLM, make_trainer
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    import lightning_cs336.callbacks as suite
    from lightning_cs336.record import RunRecord

    record = RunRecord(root, name=name, project="p", group="sweep", tags=["sweep", name])
    callbacks = [
        suite.SpeedMonitor(),
        suite.GradientNormMonitor(),
        suite.TextSampleLogger(log_every_n_steps=3, prompts=["Hello <b>"], max_new_tokens=8),
        LearningRateMonitor(),
        ModelCheckpoint(dirpath=root / name / "ckpt", monitor="val/loss", save_top_k=1, save_last=True),
    ]
    trainer = make_trainer(
        root, callbacks, [record], max_steps=6, log_every_n_steps=1, val_check_interval=3, enable_checkpointing=True
    )
    trainer.fit(TinyLM(lr=lr))


def test_cli_report_of_real_runs(tmp_path: Path) -> None:
    from lightning_cs336.cli import main

    root = tmp_path / "runs"
    for name, lr in (("lr0.01", 0.01), ("lr0.5", 0.5)):
        _fit(root, name, lr)
    out = tmp_path / "report" / "runs.html"
    with pytest.raises(SystemExit) as exc:
        main(["runs", "report", str(root / "lr0.01"), str(root / "lr0.5"), "--out", str(out)])
    assert exc.value.code in (0, None)
    text = out.read_text(encoding="utf-8")
    data = _data(text)
    assert [r["label"] for r in data["runs"]] == ["lr0.01", "lr0.5"]
    titles = {p["title"] for p in data["panels"]}
    assert {"Loss", "Learning rate", "Gradient norm", "Throughput (tokens/s)"} <= titles
    assert "lr" in text.split('<table class="config">', 1)[1].split("</table>", 1)[0]  # the one key that differs
    assert "Hello &lt;b&gt;" in text and "step 6" in text and ".ckpt" in text
    dom = _chromium(tmp_path, "--dump-dom", out.as_uri()).stdout
    assert 'data-rendered="ok"' in dom and "data-js-error" not in dom and '<path class="line"' in dom


# ------------------------------------------------------------------------------------------------------- sweep


def _sweep_runs() -> list[Run]:
    """Four trials of a sweep as ``cs336 sweep`` leaves them: sweep parameters, state and value in the summary."""
    runs = []
    trials = [(1e-4, 4, "silu", "complete"), (1e-3, 8, "gelu", "complete"), (3e-3, 4, "silu", "pruned"),
              (1e-2, 8, "gelu", "fail")]  # fmt: skip
    for i, (lr, heads, act, state) in enumerate(trials):
        run = _run(f"sweep.trial-{i}", lr, heads)
        value = None if state == "fail" else run.history["val/loss"][-1][1]
        params = {"optimizer.lr": lr, "model.num_heads": heads, "model.act": act}
        run.summary.update({"sweep/trial": i, "sweep/metric": "val/loss", "sweep/state": state, "sweep/params": params})
        if value is not None:
            run.summary["sweep/value"] = value
        if state == "pruned":
            run.summary["sweep/pruned_step"] = 150
        runs.append(run)
    runs[3].state = "failed"
    return runs


def test_sweep_view_data_and_table(tmp_path: Path) -> None:
    runs = _sweep_runs()
    text = write_report(runs, tmp_path / "sweep.html").read_text(encoding="utf-8")
    sweep = _data(text)["sweep"]
    assert [a["name"] for a in sweep["axes"]] == ["optimizer.lr", "model.num_heads", "model.act"]
    lr, heads, act = sweep["axes"]
    assert lr == {"name": "optimizer.lr", "kind": "number", "log": True}  # spans 100x
    assert heads["log"] is False and act == {"name": "model.act", "kind": "category", "choices": ["silu", "gelu"]}
    assert [r["state"] for r in sweep["rows"]] == ["complete", "complete", "pruned", "fail"]
    assert [r["run"] for r in sweep["rows"]] == [0, 1, 2, 3] and sweep["rows"][3]["value"] is None
    assert math.isclose(sweep["rows"][0]["value"], runs[0].history["val/loss"][-1][1], rel_tol=1e-6)
    table = text.split('<table class="sweep">', 1)[1].split("</table>", 1)[0]
    assert table.count("<tr>") == 5 and "pruned @150" in table and "sweep.trial-2" in table
    for column in ("trial", "state", "val/loss", "optimizer.lr", "model.num_heads", "model.act", "run"):
        assert f"<th>{html.escape(column)}</th>" in table
    # Given explicitly (the sweep driver's own report), the rows win over the summaries.
    given = {"metric": "val/ppl", "mode": "max", "rows": [{"label": "trial-9", "run": "sweep.trial-1", "state":
             "complete", "params": {"x": 1.0}, "value": 2.0}]}  # fmt: skip
    data = _data(render_report(runs, sweep=given))["sweep"]
    assert data["metric"] == "val/ppl" and data["mode"] == "max" and data["rows"][0]["run"] == 1
    assert "sweep" not in _data(render_report([_run("plain", 1e-3, 4)])) and 'id="sweep"' not in render_report(
        [_run("plain", 1e-3, 4)]
    )


SWEEP_PROBE = """<script>(function () {
  var out = {}, lines = document.querySelectorAll("#sweep-plot path.pc-line");
  out.n = lines.length;
  out.states = Array.prototype.map.call(lines, function (l) { return l.getAttribute("data-state"); });
  out.dashed = Array.prototype.map.call(lines, function (l) { return l.getAttribute("stroke-dasharray"); });
  out.strokes = Array.prototype.map.call(lines, function (l) { return l.getAttribute("stroke"); });
  var r = lines[2].getBoundingClientRect();
  lines[2].dispatchEvent(new MouseEvent("mousemove", { clientX: r.left + 5, clientY: r.top + 5, bubbles: true }));
  var tip = document.querySelector("#sweep-plot .tooltip");
  out.tip = tip.textContent;
  out.tipShown = tip.style.display;
  out.axes = document.querySelectorAll("#sweep-plot .pc-axis").length;
  document.body.dataset.probe = JSON.stringify(out);
})();</script>"""


def test_sweep_view_in_headless_chromium(tmp_path: Path) -> None:
    page = tmp_path / "sweep.html"
    text = write_report(_sweep_runs(), page).read_text(encoding="utf-8")
    page.write_text(text.replace("</body>", SWEEP_PROBE + "</body>"), encoding="utf-8")
    dom = _chromium(tmp_path, "--window-size=1280,2400", "--dump-dom", page.as_uri()).stdout
    assert 'data-rendered="ok"' in dom and "data-js-error" not in dom, re.search(r'data-js-error="([^"]*)"', dom)
    out = json.loads(html.unescape(re.search(r'data-probe="([^"]*)"', dom).group(1)))
    assert out["n"] == 4 and out["axes"] == 4  # three parameters and the metric
    assert out["states"] == ["complete", "complete", "pruned", "fail"]
    assert out["dashed"][2] == "5 3" and out["dashed"][0] == ""
    assert out["strokes"][3] == "#9ca3af" and len(set(out["strokes"][:3])) == 3  # failed grey; others by value
    assert (
        out["tipShown"] == "block"
        and "sweep.trial-2" not in out["tip"]
        and "trial-2 (pruned at step 150)" in out["tip"]
    )
    assert "optimizer.lr: 0.003" in out["tip"] and "model.act: silu" in out["tip"]
    # The failed trial has no value: its line ends at the last parameter (three points, not four).
    paths = re.findall(r'<path class="pc-line" d="([^"]+)"', dom)
    assert [p.count("L") for p in paths] == [3, 3, 3, 2]

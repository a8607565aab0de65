"""``notebooks/compare_runs.ipynb`` executed end to end: four real runs (two learning rates x two seeds, one
``group``) written by a real Trainer into run records, then the notebook run in a real Jupyter kernel against them
with ``nbclient``; it must run without an error and show the best run, a loss-curve figure, the sample history and
the ablation table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
from callback_helpers import TinyLM, make_trainer

import lightning_cs336.callbacks as suite
from lightning_cs336 import runs as lib
from lightning_cs336.record import RunRecord

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "compare_runs.ipynb"
LRS, SEEDS = (0.05, 0.5), (0, 1)
GROUP = "lr-ablation"


def _fit(root: Path, lr: float, seed: int) -> None:
    L.seed_everything(seed, verbose=False)  # the seed changes TinyLM's initial weights; its data is fixed
    record = RunRecord(root, name=f"lr{lr}-seed{seed}", project="nb", group=GROUP, tags=["ablation", f"lr={lr}"])
    record.log_hyperparams({"seed": seed})  # merged with the module's hparams, so config_diff shows lr and seed
    callbacks = [
        suite.SpeedMonitor(),  # tokens seen
        suite.RunInfoLogger(),
        suite.TextSampleLogger(log_every_n_steps=2, prompts=["ab"], max_new_tokens=3),
    ]
    trainer = make_trainer(root, callbacks, [record], max_steps=8, log_every_n_steps=1, val_check_interval=2)
    trainer.fit(TinyLM(lr=lr))


def _kernel_env(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``python3`` kernelspec that starts THIS interpreter (the venv's, where lightning_cs336 is installed), put
    first on ``JUPYTER_PATH``: a clean venv has one from ipykernel's wheel, but a user-level ``python3`` spec (in
    ``~/.local/share/jupyter``) would win over it and may start another Python. No user IPython profile either."""
    from ipykernel.kernelspec import install

    install(prefix=str(tmp / "jupyter"), kernel_name="python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp / "jupyter" / "share" / "jupyter"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp / "ipython"))
    monkeypatch.setenv("MPLBACKEND", "Agg")  # no GUI; the notebook draws inline itself (%matplotlib inline)


def _outputs(nb: Any) -> tuple[str, list[str]]:
    """All text the executed notebook showed (streams, text/plain, text/html), and the MIME types of its outputs."""
    texts: list[str] = []
    mimes: list[str] = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                texts.append(out.get("text", ""))
            for mime, value in out.get("data", {}).items():
                mimes.append(mime)
                if mime.startswith("text/"):
                    texts.append(value if isinstance(value, str) else "".join(value))
    return "\n".join(texts), mimes


@pytest.mark.slow
def test_compare_runs_notebook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("pandas")

    clean = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in clean.cells if c.cell_type == "code")

    root = tmp_path / "runs"
    for lr in LRS:
        for seed in SEEDS:
            _fit(root, lr, seed)
    runs = lib.discover_runs([root])
    assert len(runs) == 4
    best = lib.best_run(runs, "val/loss")

    _kernel_env(tmp_path, monkeypatch)
    monkeypatch.setenv("CS336_RUNS_DIR", str(root))  # the kernel inherits os.environ
    client = nbclient.NotebookClient(
        clean, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError (with the traceback) if any cell fails

    errors = [o for c in clean.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    text, mimes = _outputs(clean)
    assert f"4 runs under {root}" in text  # RUNS_DIR came from the environment, not the default
    assert f"best run: {best.name}" in text
    assert all(f"lr{lr}-seed{seed}" in text for lr in LRS for seed in SEEDS)  # the runs table
    assert "image/png" in mimes  # the loss curves, drawn inline although MPLBACKEND=Agg
    assert "text/html" in mimes  # the pandas tables
    settings = {"lr": best.config["lr"], "seed": best.config["seed"]}
    assert f"its settings: {settings}" in text  # the config diff: lr and seed, nothing volatile
    columns, rows = best.tables["samples/generations"]
    generation = rows[-1][columns.index("generation")]
    assert "prompt" in text and generation in text  # the sample history, by step
    assert "final val/loss by group and lr" in text and "delta_vs_baseline" in text and GROUP in text  # ablation
    assert "metrics.jsonl: " in text  # the record read with pandas

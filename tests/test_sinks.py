"""Where values go: ``callbacks/_sinks.py`` dispatches on the logger's class, subclasses included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from callback_helpers import TinyLM, csv_rows, finish_and_read, make_loggers, make_trainer
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from lightning_cs336.callbacks import _sinks


class MyWandbLogger(WandbLogger):
    """A user's subclass: must still be treated as W&B (the old class-name match sent it to the JSONL fallback)."""


class RecordingLogger(Logger):
    """A logger that implements the sink methods itself (the way a local run record plugs in)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, Any]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append(("metrics", (dict(metrics), step)))

    def log_table(self, key: str, columns: list[str], data: list[list[Any]], step: int | None = None) -> None:
        self.calls.append(("table", (key, columns, data, step)))

    def log_histograms(self, histograms: Any, stats: Any, step: int | None = None) -> None:
        self.calls.append(("histograms", (sorted(histograms), dict(stats), step)))

    def log_summary(self, summary: dict[str, Any], step: int | None = None) -> None:
        self.calls.append(("summary", (dict(summary), step)))


class SinkUser(Callback):
    """Sends one of each object kind at the end of training."""

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        _sinks.log_scalars(trainer, {"a/x": torch.tensor(1.5), "a/flag": True}, step=7)
        _sinks.log_table(trainer, "t/rows", ["step", "text"], [[7, "new"]], step=7, all_rows=[[5, "old"], [7, "new"]])
        hist = {"h/w": ({"min": 0.0, "max": 1.0, "num": 2, "sum": 1.0, "sum_squares": 1.0}, [1, 1], [0.0, 0.5, 1.0])}
        _sinks.log_histograms(trainer, hist, {"h/w/mean": 0.5}, step=7)
        _sinks.log_summary(trainer, {"s/final": 2.0}, step=7, file_name="summary.json")


def test_subclass_of_wandb_logger_gets_wandb_objects(tmp_path: Path, wandb_env: Path) -> None:
    logger = MyWandbLogger(save_dir=str(tmp_path), project="cs336-tests", offline=True)
    assert _sinks.find_logger(make_trainer(tmp_path, [], [logger]), WandbLogger) is logger
    make_trainer(tmp_path, [SinkUser()], [logger], max_steps=1).fit(TinyLM())
    run = finish_and_read(tmp_path)
    assert run.tables["t/rows"]["data"] == [[5, "old"], [7, "new"]]  # W&B gets every row (no appends)
    assert run.summary["s/final"] == 2
    assert not list(tmp_path.rglob("t_rows.jsonl"))  # not the fallback


def test_logger_with_its_own_sink_methods_gets_the_calls(tmp_path: Path) -> None:
    logger = RecordingLogger()
    make_trainer(tmp_path, [SinkUser()], [logger], max_steps=1).fit(TinyLM())
    kinds = {kind: payload for kind, payload in logger.calls if kind != "metrics" or payload[1] == 7}
    assert kinds["metrics"] == ({"a/x": 1.5, "a/flag": 1.0}, 7)
    assert kinds["table"] == ("t/rows", ["step", "text"], [[7, "new"]], 7)  # only the new rows
    assert kinds["histograms"] == (["h/w"], {"h/w/mean": 0.5}, 7)
    assert kinds["summary"] == ({"s/final": 2.0}, 7)


def test_plain_logger_fallbacks(tmp_path: Path) -> None:
    (csv,) = make_loggers(tmp_path, ("csv",))
    assert isinstance(csv, CSVLogger)
    make_trainer(tmp_path, [SinkUser()], [csv], max_steps=1).fit(TinyLM())
    log_dir = Path(csv.log_dir)
    assert [json.loads(line) for line in (log_dir / "t_rows.jsonl").read_text().splitlines()] == [
        {"step": 7, "text": "new"}
    ]
    rows = csv_rows(csv)
    assert any(r.get("h/w/mean") == "0.5" for r in rows) and any(r.get("s/final") == "2.0" for r in rows)
    assert json.loads((log_dir / "summary.json").read_text())["summary"] == {"s/final": 2.0}


def test_to_host_is_one_transfer_per_device() -> None:
    values = {f"k{i}": torch.tensor(float(i)) for i in range(5)}
    assert _sinks.to_host({**values, "s": "text"}) == {**{f"k{i}": float(i) for i in range(5)}, "s": "text"}
    rows = _sinks.to_host_rows({"a": torch.arange(3.0), "b": torch.ones(3)})
    assert rows == {"a": [0.0, 1.0, 2.0], "b": [1.0, 1.0, 1.0]}

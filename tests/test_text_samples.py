"""TextSampleLogger: real Trainer runs with real offline W&B, CSV and TensorBoard loggers, read back from disk."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from callback_helpers import (
    CharTokenizer,
    RandomTokens,
    TinyLM,
    finish_and_read,
    make_loggers,
    make_trainer,
    run_script,
)
from lightning.pytorch import Callback, LightningModule

from lightning_cs336.callbacks.text_samples import TextSampleLogger
from lightning_cs336.wandb_reader import latest_run

# Keys Lightning itself logs in these runs (TinyLM's train/loss, and the WandbLogger/CSV bookkeeping).
LIGHTNING_KEYS = {"train/loss", "val/loss", "epoch", "trainer/global_step", "step", "_step", "_runtime", "_timestamp"}
PROMPTS = ["Hello", "ab"]  # different lengths: generate gets a ragged list of lists


def _finish_wandb() -> None:
    # WandbLogger does not finish its run; nothing reaches the .wandb file until it does.
    import wandb

    wandb.finish()


def _sampler_warnings(records: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in records if str(w.message).startswith("TextSampleLogger")]


class RecordingLM(TinyLM):
    """TinyLM that records how generate was called (mode, grad, prompt type, generator)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: list[dict[str, Any]] = []

    def generate(self, prompt_ids, max_new_tokens, temperature=1.0, top_p=1.0, eos_id=None, generator=None):
        self.calls.append(
            {
                "training": self.training,
                "submodules_training": [m.training for m in self.modules()],
                "grad_enabled": torch.is_grad_enabled(),
                "prompt_type": type(prompt_ids),
                "generator": generator,
                "eos_id": eos_id,
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "top_p": top_p,
            }
        )
        return super().generate(prompt_ids, max_new_tokens, temperature, top_p, eos_id, generator)


def test_lightningcli_yaml_example_instantiates() -> None:
    """The YAML example in the docstring parses with jsonargparse (what LightningCLI uses) into a working callback."""
    import textwrap

    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch import Callback as _Callback

    config = yaml.safe_load(textwrap.dedent(TextSampleLogger.__doc__.split("In a LightningCLI config::")[1]))
    parser = ArgumentParser()
    parser.add_argument("--trainer.callbacks", type=list[_Callback])
    (callback,) = parser.instantiate(parser.parse_object(config)).trainer.callbacks
    assert isinstance(callback, TextSampleLogger)
    assert callback.every_n_steps == 500 and callback.prompts == ["Once upon a time", "The capital of France is"]


def test_metric_keys_documented() -> None:
    doc = TextSampleLogger.__doc__
    for key in TextSampleLogger.METRIC_KEYS:
        assert f"``{key}``" in doc
    for column in TextSampleLogger.COLUMNS:
        assert column in doc
    assert "Example::" in doc and "class_path: lightning_cs336.callbacks.text_samples.TextSampleLogger" in doc


def test_wandb_table_keeps_every_row(tmp_path: Path) -> None:
    callback = TextSampleLogger(every_n_steps=2, prompts=PROMPTS, max_new_tokens=6, temperature=1.0, top_p=0.9)
    model = RecordingLM()
    trainer = make_trainer(tmp_path, [callback], make_loggers(tmp_path, ("wandb",)), max_steps=5)
    trainer.fit(model)
    _finish_wandb()
    run = finish_and_read(tmp_path)

    # Periodic calls after 2 and 4 optimizer steps, plus the end-of-training call at step 5.
    table = run.tables["samples/generations"]
    assert table["columns"] == list(TextSampleLogger.COLUMNS)
    assert [row[0] for row in table["data"]] == [2, 2, 4, 4, 5, 5]
    assert [row[1] for row in table["data"]] == PROMPTS * 3
    for row in table["data"]:
        _, _, generation, temperature, top_p, max_tokens, tokens_per_sec = row
        assert isinstance(generation, str) and len(generation) <= 6
        assert (temperature, top_p, max_tokens) == (1.0, 0.9, 6)
        assert tokens_per_sec > 0
    # Each logging re-logs the whole history: 2, then 4, then 6 rows.
    refs = [value for _, value in run.history_of("samples/generations")]
    assert [ref["nrows"] for ref in refs] == [2, 4, 6]
    assert [step for step, _ in run.history_of("samples/generations")] == [2, 4, 5]

    # Scalars only at sampling steps, with plausible values.
    assert [s for s, _ in run.history_of("samples/generation_sec")] == [2, 4, 5]
    assert all(v > 0 for _, v in run.history_of("samples/generation_sec"))
    assert [s for s, _ in run.history_of("samples/tokens_per_sec")] == [2, 4, 5]
    # The logged keys are exactly the documented ones.
    assert run.keys() - LIGHTNING_KEYS == set(TextSampleLogger.METRIC_KEYS)

    # Generation ran under no_grad in eval mode, with ragged prompts as lists and a generator on the model's device.
    assert len(model.calls) == 3
    for call in model.calls:
        assert call["training"] is False and not any(call["submodules_training"]) and call["grad_enabled"] is False
        assert call["prompt_type"] is list
        assert isinstance(call["generator"], torch.Generator) and call["generator"].device == model.device
        assert call["eos_id"] == CharTokenizer.eot_id and call["max_new_tokens"] == 6


def test_no_duplicate_end_call_and_no_periodic(tmp_path: Path) -> None:
    periodic = TextSampleLogger(every_n_steps=2, prompts=PROMPTS, max_new_tokens=3)
    trainer = make_trainer(tmp_path, [periodic], make_loggers(tmp_path, ("csv",)), max_steps=4)
    trainer.fit(TinyLM())
    # The end of training is step 4, already sampled: no duplicate rows.
    assert [row[0] for row in periodic.rows] == [2, 2, 4, 4]

    end_only = TextSampleLogger(every_n_steps=None, prompts=PROMPTS, max_new_tokens=3)
    trainer = make_trainer(tmp_path / "b", [end_only], make_loggers(tmp_path / "b", ("csv",)), max_steps=3)
    trainer.fit(TinyLM())
    assert [row[0] for row in end_only.rows] == [3, 3]


def test_counts_optimizer_steps_under_gradient_accumulation(tmp_path: Path) -> None:
    callback = TextSampleLogger(every_n_steps=2, prompts=PROMPTS, max_new_tokens=2)
    model = RecordingLM()
    trainer = make_trainer(
        tmp_path, [callback], make_loggers(tmp_path, ("csv",)), max_steps=4, accumulate_grad_batches=2
    )
    trainer.fit(model)
    # 8 batches, 4 optimizer steps: samples after optimizer steps 2 and 4 only (not at every micro-batch).
    assert [row[0] for row in callback.rows] == [2, 2, 4, 4]
    assert len(model.calls) == 2


def test_csv_jsonl_and_tensorboard_text_fallbacks_with_prefix(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = TextSampleLogger(every_n_steps=2, prompts=PROMPTS, max_new_tokens=4, prefix="ft/")
    loggers = make_loggers(tmp_path, ("csv", "tensorboard"))
    trainer = make_trainer(tmp_path, [callback], loggers, max_steps=5)
    trainer.fit(TinyLM())
    csv_logger, tb_logger = loggers

    # CSV: the rows as JSON lines (new rows per call), named after the prefixed key.
    lines = (Path(csv_logger.log_dir) / "ft_samples_generations.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [2, 2, 4, 4, 5, 5]
    assert [r["prompt"] for r in records] == PROMPTS * 3
    assert set(records[0]) == set(TextSampleLogger.COLUMNS)
    assert [[r[c] for c in TextSampleLogger.COLUMNS] for r in records] == callback.rows
    # CSV scalars, prefixed, at the sampling steps only.
    import csv

    with open(Path(csv_logger.log_dir) / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    sampled = [r for r in rows if r.get("ft/samples/generation_sec")]
    assert [int(r["step"]) for r in sampled] == [2, 4, 5]
    assert all(float(r["ft/samples/tokens_per_sec"]) > 0 for r in sampled)
    logged = {k for r in rows for k, v in r.items() if v} - LIGHTNING_KEYS
    assert logged == {"ft/samples/generation_sec", "ft/samples/tokens_per_sec"}

    # TensorBoard: one text summary per call under the prefixed key.
    acc = EventAccumulator(tb_logger.log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    tag = next(t for t in tags if t.startswith("ft/samples/generations"))
    events = acc.Tensors(tag)
    assert [e.step for e in events] == [2, 4, 5]
    text = events[-1].tensor_proto.string_val[0].decode()
    assert "| step | prompt | generation |" in text and "Hello" in text


def test_fixed_seed_gives_identical_generations_for_identical_weights(tmp_path: Path) -> None:
    # lr=0: the weights never change, so every call must produce exactly the same samples.
    callback = TextSampleLogger(every_n_steps=1, prompts=PROMPTS, max_new_tokens=8, temperature=1.0, seed=7)
    trainer = make_trainer(tmp_path, [callback], make_loggers(tmp_path, ("csv",)), max_steps=3)
    trainer.fit(TinyLM(lr=0.0))
    by_step: dict[int, list[str]] = {}
    for step, _, generation, *_ in callback.rows:
        by_step.setdefault(step, []).append(generation)
    assert sorted(by_step) == [1, 2, 3]
    assert by_step[1] == by_step[2] == by_step[3]
    assert by_step[1][0] != by_step[1][1] or len(by_step[1][0]) > 0

    # A different seed samples something else (96-token vocabulary, 8 tokens: a collision is negligible).
    other = TextSampleLogger(every_n_steps=None, prompts=PROMPTS, max_new_tokens=8, temperature=1.0, seed=8)
    trainer = make_trainer(tmp_path / "b", [other], make_loggers(tmp_path / "b", ("csv",)), max_steps=1)
    trainer.fit(TinyLM(lr=0.0))
    assert [row[2] for row in other.rows] != by_step[1]


def test_training_mode_restored_exactly_and_rng_untouched(tmp_path: Path) -> None:
    class FreezeAndCheck(Callback):
        """Puts one submodule in eval mode (a frozen part) and checks the modes after the sampler ran."""

        def __init__(self) -> None:
            self.checked = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            pl_module.layers[0].eval()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            assert pl_module.training is True
            assert pl_module.layers[0].training is False
            assert pl_module.layers[1].training is True and pl_module.head.training is True
            assert torch.is_grad_enabled()
            self.checked += 1

    class GlobalRandomLM(RecordingLM):
        """A generate that draws from the GLOBAL RNG: the callback must not let it shift training's randomness."""

        def generate(self, prompt_ids, max_new_tokens, **kwargs):
            torch.rand(100)
            return super().generate(prompt_ids, max_new_tokens, **kwargs)

    checker = FreezeAndCheck()
    model, baseline_model = GlobalRandomLM(), GlobalRandomLM()
    sampler = TextSampleLogger(every_n_steps=1, prompts=["abc", "xyz"], max_new_tokens=2)
    torch.manual_seed(123)
    trainer = make_trainer(tmp_path, [sampler, checker], make_loggers(tmp_path, ("csv",)), max_steps=3)
    trainer.fit(model)
    assert checker.checked == 3 and len(model.calls) == 3
    # Equal-length prompts are passed as one (B, T) LongTensor.
    assert all(call["prompt_type"] is torch.Tensor for call in model.calls)
    assert all(call["training"] is False and call["grad_enabled"] is False for call in model.calls)
    after_with_sampling = torch.rand(1)

    torch.manual_seed(123)
    trainer = make_trainer(tmp_path / "b", [checker], make_loggers(tmp_path / "b", ("csv",)), max_steps=3)
    trainer.fit(baseline_model)
    assert torch.equal(after_with_sampling, torch.rand(1))


def test_module_without_hooks_warns_once_and_trains(tmp_path: Path) -> None:
    callback = TextSampleLogger(every_n_steps=1, prompts=PROMPTS)
    trainer = make_trainer(tmp_path, [callback], make_loggers(tmp_path, ("wandb",)), max_steps=3)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer.fit(TinyLM(with_hooks=False))  # has generate, but no tokenizer
    _finish_wandb()
    messages = _sampler_warnings(records)
    assert len(messages) == 1 and "tokenizer" in messages[0]
    assert trainer.global_step == 3
    assert callback.rows == []
    assert not any(k.startswith("samples/") for k in finish_and_read(tmp_path).keys())


def test_generate_failure_warns_once_and_trains(tmp_path: Path) -> None:
    class BrokenLM(TinyLM):
        def generate(self, *args: Any, **kwargs: Any) -> list[list[int]]:
            raise RuntimeError("boom")

    callback = TextSampleLogger(every_n_steps=1, prompts=PROMPTS)
    trainer = make_trainer(tmp_path, [callback], make_loggers(tmp_path, ("csv",)), max_steps=3)
    model = BrokenLM()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer.fit(model)
    messages = _sampler_warnings(records)
    assert len(messages) == 1 and "boom" in messages[0]
    assert trainer.global_step == 3 and model.training


def test_no_logger_warns_once_and_does_not_generate(tmp_path: Path) -> None:
    callback = TextSampleLogger(every_n_steps=1, prompts=PROMPTS)
    model = RecordingLM()
    trainer = make_trainer(tmp_path, [callback], False, max_steps=2)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer.fit(model)
    messages = _sampler_warnings(records)
    assert len(messages) == 1 and "no logger" in messages[0]
    assert model.calls == []


def test_prompts_from_validation_windows(tmp_path: Path) -> None:
    callback = TextSampleLogger(every_n_steps=2, prompts=None, num_val_prompts=3, prompt_tokens=5, max_new_tokens=3)
    model = RecordingLM()
    trainer = make_trainer(tmp_path, [callback], make_loggers(tmp_path, ("csv",)), max_steps=4)
    trainer.fit(model)
    # TinyLM's validation set: RandomTokens(16, seq_len=16, seed=1); windows x = data[i, :-1].
    windows = RandomTokens(16, 16, 96, seed=1).data[:3, :5].tolist()
    expected = [CharTokenizer().decode(w) for w in windows]
    assert [row[1] for row in callback.rows] == expected * 2
    assert callback.state_dict()["val_prompt_ids"] == windows
    # Equal-length windows are passed as one (3, 5) tensor.
    assert all(call["prompt_type"] is torch.Tensor for call in model.calls)

    # With no validation data at all: one warning, no samples, training completes.
    class NoValLM(TinyLM):
        # Lightning's default, which raises when called: no validation data anywhere.
        val_dataloader = LightningModule.val_dataloader

    lonely = TextSampleLogger(every_n_steps=1, prompts=None)
    trainer = make_trainer(tmp_path / "b", [lonely], make_loggers(tmp_path / "b", ("csv",)), max_steps=2)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer.fit(NoValLM())
    messages = _sampler_warnings(records)
    assert len(messages) == 1 and "validation" in messages[0]
    assert lonely.rows == [] and trainer.global_step == 2


def test_state_dict_round_trip_and_old_checkpoints() -> None:
    callback = TextSampleLogger(prompts=PROMPTS)
    callback._rows = [[2, "Hello", "x", 0.8, 0.95, 64, 10.0]]
    callback._last_step = 2
    callback._val_prompt_ids = [[1, 2, 3]]
    fresh = TextSampleLogger(prompts=PROMPTS)
    fresh.load_state_dict(callback.state_dict())
    assert fresh.rows == callback.rows and fresh._last_step == 2 and fresh._val_prompt_ids == [[1, 2, 3]]
    # An empty (older) state loads without error and resets.
    fresh.load_state_dict({})
    assert fresh.rows == [] and fresh._last_step is None and fresh._val_prompt_ids is None


def test_resume_keeps_earlier_rows(tmp_path: Path) -> None:
    first = TextSampleLogger(every_n_steps=2, prompts=None, num_val_prompts=2, prompt_tokens=4, max_new_tokens=3)
    trainer = make_trainer(tmp_path / "a", [first], make_loggers(tmp_path / "a", ("wandb",)), max_steps=4)
    trainer.fit(TinyLM())
    ckpt = tmp_path / "step4.ckpt"
    trainer.save_checkpoint(ckpt)
    _finish_wandb()

    second = TextSampleLogger(every_n_steps=2, prompts=None, num_val_prompts=2, prompt_tokens=4, max_new_tokens=3)
    trainer = make_trainer(tmp_path / "b", [second], make_loggers(tmp_path / "b", ("wandb",)), max_steps=8)
    trainer.fit(TinyLM(), ckpt_path=str(ckpt))
    _finish_wandb()
    assert [row[0] for row in second.rows] == [2, 2, 4, 4, 6, 6, 8, 8]
    assert second.rows[:4] == first.rows
    # The same validation windows are used after the resume.
    assert [row[1] for row in second.rows] == [row[1] for row in first.rows] * 2
    # The resumed run's W&B table holds the earlier rows too.
    table = finish_and_read(tmp_path / "b").tables["samples/generations"]
    assert [row[0] for row in table["data"]] == [2, 2, 4, 4, 6, 6, 8, 8]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "every_n_steps must be a positive integer or None, got 0"),
        ({"every_n_steps": True}, "every_n_steps .* got True"),
        ({"prompts": "hello"}, "prompts must be a list of strings or None, got 'hello'"),
        ({"prompts": []}, r"prompts must be a non-empty list of non-empty strings, got \[\]"),
        ({"prompts": ["ok", ""]}, "non-empty strings, got"),
        ({"num_val_prompts": 0}, "num_val_prompts must be a positive integer, got 0"),
        ({"prompt_tokens": -3}, "prompt_tokens must be a positive integer, got -3"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be a positive integer, got 2.5"),
        ({"temperature": -0.1}, "temperature must be a number >= 0, got -0.1"),
        ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, "got 1.5"),
        ({"seed": "x"}, "seed must be an integer, got 'x'"),
        ({"sample_at_end": 1}, "sample_at_end must be a bool, got 1"),
        ({"prefix": 3}, "prefix must be a string, got 3"),
    ],
)
def test_constructor_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TextSampleLogger(**kwargs)


_DIST_SCRIPT = """
import json
import sys

import lightning as L
import torch

from callback_helpers import FullyShardLayers, TinyLM, make_loggers, two_process_strategy
from lightning_cs336.callbacks.text_samples import TextSampleLogger

STRATEGY = {strategy!r}


class Recording(TinyLM):
    def generate(self, prompt_ids, max_new_tokens, **kwargs):
        out = super().generate(prompt_ids, max_new_tokens, **kwargs)
        ids = prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else prompt_ids
        with open({root!r} + f"/calls_rank{{self.global_rank}}.jsonl", "a") as fh:
            fh.write(json.dumps({{"step": self.trainer.global_step, "prompts": ids, "out": out}}) + "\\n")
        return out


class Sharded(FullyShardLayers, Recording):
    pass


torch.manual_seed(0)
model = (Sharded if STRATEGY == "fsdp2" else Recording)(batch_size=4)
strategy = two_process_strategy(STRATEGY)
trainer = L.Trainer(
    default_root_dir={root!r},
    accelerator="cpu",
    devices=2,
    strategy=strategy,
    max_steps=4,
    log_every_n_steps=1,
    logger=make_loggers({root!r}, ("wandb", "csv")),
    callbacks=[TextSampleLogger(every_n_steps=2, prompts=None, num_val_prompts=2, prompt_tokens=4, max_new_tokens=4)],
    enable_progress_bar=False,
    enable_model_summary=False,
    enable_checkpointing=False,
    limit_val_batches=1,
)
trainer.fit(model)
import wandb

if wandb.run is not None:
    wandb.finish()
"""


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process_generates_on_every_rank_logs_once(tmp_path: Path, wandb_env: Path, strategy: str) -> None:
    """Every rank generates, from rank zero's validation windows (broadcast), with the same seed; only rank zero
    logs. Under FSDP2 the forward passes are collectives, so this would hang if only rank zero generated."""

    root = tmp_path / "run"
    root.mkdir()
    source = _DIST_SCRIPT.format(strategy=strategy, root=str(root))
    run_script(tmp_path, source)

    calls = {
        rank: [json.loads(line) for line in (root / f"calls_rank{rank}.jsonl").read_text().splitlines()]
        for rank in (0, 1)
    }
    # Both ranks generated at the same steps (2, 4; the end call at 4 is deduplicated), from the same prompts,
    # and sampled the same tokens.
    assert [c["step"] for c in calls[0]] == [c["step"] for c in calls[1]] == [2, 4]
    assert calls[0] == calls[1]
    prompts = calls[0][0]["prompts"]
    assert len(prompts) == 2 and all(len(p) == 4 for p in prompts)

    from lightning_cs336.wandb_reader import find_runs

    assert len(find_runs(tmp_path)) == 1
    table = latest_run(root, wait_s=30).tables["samples/generations"]
    assert [row[0] for row in table["data"]] == [2, 2, 4, 4]
    assert [row[1] for row in table["data"]] == [CharTokenizer().decode(p) for p in prompts] * 2
    jsonl = list(root.rglob("samples_generations.jsonl"))
    assert len(jsonl) == 1 and len(jsonl[0].read_text().splitlines()) == 4

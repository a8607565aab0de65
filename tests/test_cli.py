"""The `cs336` command: config parsing, bad input, an end-to-end fit, generate, prepare and CS336 conversion."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from lightning_cs336.cli import default_wandb_mode, main
from lightning_cs336.wandb_reader import latest_run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def run_main(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_main(["fit", "--config", str(config), "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed and "trainer:" in printed


def test_unknown_config_key_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_modle: 64\n")
    assert run_main(["fit", "--config", str(CONFIGS[0]), "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "d_modle" in err and "--help" in err
    assert "usage:" not in err  # no 40-line usage dump
    # A misspelt option is not prefix-matched to a real one.
    assert run_main(["fit", "--config", str(CONFIGS[0]), "--trainer.max_step", "3"]) == 2
    assert "max_step" in capsys.readouterr().err


def test_missing_data_names_the_fix_and_writes_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code = run_main(["fit", "--config", str(ROOT / "configs/debug.yaml"), "--data.data_dir", "nope"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("cs336: error:")]
    assert len(lines) == 1 and "cs336 prepare" in lines[0] and "nope" in lines[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "checkpoints").exists()


def test_default_wandb_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_MODE")
    assert default_wandb_mode() == "offline" and os.environ["WANDB_MODE"] == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert default_wandb_mode() == "online" and "WANDB_MODE" not in os.environ
    monkeypatch.delenv("WANDB_API_KEY")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    os.chmod(tmp_path / "netrc", 0o600)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert default_wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert default_wandb_mode() == "disabled"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path):
    """`cs336 fit --config configs/debug.yaml` on the tiny corpus, in-process, in a scratch working directory."""
    work = tmp_path_factory.mktemp("cli_fit")
    old = os.getcwd()
    os.chdir(work)
    try:
        mp = pytest.MonkeyPatch()
        for key, value in {
            "WANDB_MODE": "offline",
            "WANDB_DIR": str(work),
            "WANDB_SILENT": "true",
            "WANDB_DATA_DIR": str(work / "wd"),
            "WANDB_CACHE_DIR": str(work / "wc"),
            "WANDB_CONFIG_DIR": str(work / "wcfg"),
            "WANDB_DISABLE_GIT": "true",
        }.items():
            mp.setenv(key, value)
        code = run_main(
            [
                "fit",
                "--config",
                str(ROOT / "configs/debug.yaml"),
                "--data.data_dir",
                str(tiny_data),
                "--trainer.enable_progress_bar",
                "false",
            ]
        )
        import wandb

        wandb.finish()
        wandb.teardown()
        mp.undo()
    finally:
        os.chdir(old)
    return work, code


def test_fit_end_to_end(fitted) -> None:
    work, code = fitted
    assert code == 0
    assert (work / "runs/cs336-debug/debug/checkpoints/last.ckpt").is_file()
    run = latest_run(work / "runs/cs336-debug/debug", wait_s=30)
    assert run.finished and run.project == "cs336-debug"
    steps = [step for step, _ in run.history_of("train/loss")]
    assert steps and max(steps) >= 15
    assert {"val/loss", "val/ppl"} <= run.keys()
    # The linked values: vocab from the data, context from the model.
    assert run.config["vocab_size"] == 257 and run.config["context_length"] == 32
    assert (work / "runs/cs336-debug/debug/config.yaml").is_file()


def test_generate_from_checkpoint(fitted, capsys) -> None:
    work, _ = fitted
    ckpt = work / "runs/cs336-debug/debug/checkpoints/last.ckpt"
    args = ["generate", "--ckpt", str(ckpt), "--prompt", "import ", "--max-new-tokens", "10", "--temperature", "0"]
    assert run_main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("import ")
    assert run_main(args) == 0
    assert capsys.readouterr().out == first  # greedy decoding is deterministic
    assert run_main(["generate", "--ckpt", str(work / "missing.ckpt")]) == 2
    assert "neither an existing file nor a W&B artifact" in capsys.readouterr().err
    # An artifact reference with no W&B credentials fails at once with the fix, not after a network timeout.
    assert run_main(["generate", "--ckpt", "team/cs336/model-abc123:best"]) == 2
    assert "WANDB_API_KEY" in capsys.readouterr().err


def test_export_import_cs336(fitted, tmp_path, capsys) -> None:
    work, _ = fitted
    out = tmp_path / "cs336.pt"
    assert (
        run_main(
            ["export-cs336", "--ckpt", str(work / "runs/cs336-debug/debug/checkpoints/last.ckpt"), "--out", str(out)]
        )
        == 0
    )
    back = tmp_path / "back.ckpt"
    args = ["import-cs336", "--src", str(out), "--out", str(back), "--num-heads", "2", "--context-length", "32"]
    assert run_main(args) == 0
    capsys.readouterr()
    assert run_main(["generate", "--ckpt", str(back), "--prompt", "x", "--max-new-tokens", "3"]) == 2
    assert "no tokenizer" in capsys.readouterr().err  # a CS336 file carries weights only


def test_prepare_through_cs336(tmp_path: Path, capsys) -> None:
    (tmp_path / "a.txt").write_text("hello world\n" * 200)
    (tmp_path / "b.txt").write_text("another document\n" * 200)
    out = tmp_path / "data"
    assert (
        run_main(
            ["prepare", str(tmp_path / "*.txt"), "--out", str(out), "--tokenizer", "byte", "--val-fraction", "0.5"]
        )
        == 0
    )
    assert (out / "meta.json").is_file() and (out / "train.bin").is_file()
    assert run_main(["prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "d2")]) == 2
    assert not (tmp_path / "d2" / "meta.json").exists()


def test_resume_through_cli_and_bad_ckpt_path(fitted, tiny_data, tmp_path, monkeypatch, capsys) -> None:
    work, _ = fitted
    monkeypatch.chdir(tmp_path)
    base = [
        "fit",
        "--config",
        str(ROOT / "configs/debug.yaml"),
        "--data.data_dir",
        str(tiny_data),
        "--trainer.enable_progress_bar",
        "false",
    ]
    assert run_main([*base, "--ckpt_path", str(tmp_path / "missing.ckpt")]) == 2
    err = capsys.readouterr().err
    assert "missing.ckpt" in err and "neither an existing file nor a W&B artifact" in err
    assert not (tmp_path / "runs").exists()  # nothing written before the error
    assert run_main([*base, "--ckpt_path", "team/cs336/model-abc123:best"]) == 2
    assert "WANDB_API_KEY" in capsys.readouterr().err
    # A local checkpoint resumes its own run (its directory, record and W&B run): 20 steps done, 10 more.
    assert (
        run_main(
            [
                *base,
                "--trainer.max_steps",
                "30",
                "--ckpt_path",
                str(work / "runs/cs336-debug/debug/checkpoints/last.ckpt"),
            ]
        )
        == 0
    )
    import torch

    assert torch.load(work / "runs/cs336-debug/debug/checkpoints/last.ckpt", weights_only=False)["global_step"] == 30
    assert not (tmp_path / "runs").exists()


def test_fit_without_config_is_a_clear_error(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_main(["fit"]) == 2
    err = capsys.readouterr().err
    assert "without --config would train forever" in err and "configs/quickstart.yaml" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "lightning_logs").exists()


def test_predict_is_not_offered(capsys) -> None:
    assert run_main(["--help"]) == 0
    assert "predict" not in capsys.readouterr().out
    assert run_main(["predict"]) == 2


@pytest.mark.parametrize(
    ("option", "value", "rule"),
    [("--temperature", "-1", ">= 0"), ("--top-p", "0", "(0, 1]"), ("--max-new-tokens", "0", "at least 1")],
)
def test_generate_rejects_out_of_range_sampling(fitted, option: str, value: str, rule: str, capsys) -> None:
    work, _ = fitted
    assert (
        run_main(["generate", "--ckpt", str(work / "runs/cs336-debug/debug/checkpoints/last.ckpt"), option, value]) == 2
    )
    err = capsys.readouterr().err
    assert f"{option} {value}" in err and rule in err and "Traceback" not in err


def test_generate_with_the_default_empty_prompt(fitted, capsys) -> None:
    work, _ = fitted
    assert (
        run_main(
            ["generate", "--ckpt", str(work / "runs/cs336-debug/debug/checkpoints/last.ckpt"), "--max-new-tokens", "5"]
        )
        == 0
    )
    assert capsys.readouterr().out.endswith("\n")  # printed a sample (it may be only whitespace) instead of crashing


def test_import_cs336_stores_the_tokenizer_and_generate_uses_it(fitted, tiny_data, tmp_path, capsys) -> None:
    """export -> import with the data's tokenizer -> generate: the same greedy text as the original checkpoint."""
    work, _ = fitted
    ckpt = sorted(work.rglob("last.ckpt"))[0]
    cs336 = tmp_path / "model.pt"
    assert run_main(["export-cs336", "--ckpt", str(ckpt), "--out", str(cs336)]) == 0
    base = ["import-cs336", "--src", str(cs336), "--num-heads", "2", "--context-length", "32"]
    sample = ["--prompt", "import ", "--max-new-tokens", "12", "--temperature", "0"]
    capsys.readouterr()
    assert run_main(["generate", "--ckpt", str(ckpt), *sample]) == 0
    expected = capsys.readouterr().out
    assert expected.startswith("import ")
    for i, how in enumerate((["--tokenizer", str(tiny_data)], ["--tokenizer", str(tiny_data / "tokenizer.json")])):
        out = tmp_path / f"imported{i}.ckpt"
        assert run_main([*base, "--out", str(out), *how]) == 0
        captured = capsys.readouterr()
        assert "note" not in captured.err and str(out) in captured.out
        assert run_main(["generate", "--ckpt", str(out), *sample]) == 0
        assert capsys.readouterr().out == expected  # same weights, same tokenizer: the same greedy continuation
    out = tmp_path / "from_data_dir.ckpt"
    assert run_main([*base, "--out", str(out), "--data-dir", str(tiny_data)]) == 0
    import torch

    from lightning_cs336.data import Tokenizer

    stored = torch.load(out, map_location="cpu", weights_only=False)["tokenizer"]
    assert stored == Tokenizer.from_file(tiny_data / "tokenizer.json").to_str()
    assert run_main([*base, "--out", str(tmp_path / "x.ckpt"), "--data-dir", str(tiny_data), "--tokenizer", "t"]) == 2
    capsys.readouterr()

    # Without a tokenizer: the import works and says, in one line, what generate will need.
    bare = tmp_path / "bare.ckpt"
    assert run_main([*base, "--out", str(bare)]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(notes) == 1 and notes[0].startswith("cs336: note:") and "--tokenizer" in notes[0]
    assert run_main(["generate", "--ckpt", str(bare), *sample]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no tokenizer" in err[0] and "--tokenizer" in err[0]
    assert run_main(["generate", "--ckpt", str(bare), "--tokenizer", str(tiny_data), *sample]) == 0
    assert capsys.readouterr().out == expected


def test_import_and_generate_help_describe_the_tokenizer(capsys) -> None:
    def help_text(command: str) -> str:
        assert run_main([command, "--help"]) == 0
        # argparse wraps at hyphens too ("import-\ncs336"): undo the wrapping before looking for phrases.
        return re.sub(r"-\s+", "-", " ".join(capsys.readouterr().out.split()))

    text = help_text("import-cs336")
    assert "--tokenizer" in text and "--data-dir" in text and "cs336 generate" in text
    text = help_text("generate")
    assert "cs336 import-cs336" in text and "--tokenizer" in text

"""The bad-input catalogue: every malformed config, data file, checkpoint and option a user can produce, tried through
the ``cs336`` command, each checked for one line naming the problem and the fix, no traceback, a non-zero exit and
no partial output.

Every case runs in its own empty working directory (``trainer.default_root_dir`` inside it, W&B's directory beside
it), and after the command that directory must still be empty and W&B must hold no run. Cases run in-process through
:func:`lightning_cs336.cli.main` (the same code as the console script, without a 10-20 s interpreter start), except
those that resume or validate a checkpoint through ``cs336 fit|validate``, which run as a real
``python -m lightning_cs336`` subprocess.

The README's catalogue table is :func:`readme_table`; ``python tests/test_bad_input.py`` runs every case and prints
the table with the lines the user actually sees.

Parse errors are held to the same rule: one ``cs336: error:`` line. jsonargparse's own form today is a ``tip:`` line,
an ``error:`` line and, for a wrong type or a YAML error, more lines of detail; those cases are strict xfails naming the
fix in ``cli/fit.py`` until it is made. A case marked ``lead=`` is such an xfail: it fails loudly (XPASS) once fixed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from lightning_cs336.cli import main

ROOT = Path(__file__).resolve().parents[1]
SEEN: dict[str, str] = {}  # case id -> the error line it printed (paths shortened), filled as the cases run
DEBUG = str(ROOT / "configs" / "debug.yaml")


@dataclass
class Inputs:
    """What a case's ``setup`` may write into (``inputs``, outside the checked working dir) and the shared fixtures."""

    inputs: Path
    data: Path  # a private copy of the tiny prepared corpus, for the case to corrupt
    ckpt: Path  # a Lightning checkpoint written by `cs336 fit` (2 steps of configs/debug.yaml)
    cs336: Path  # the same model exported to the CS336 format


@dataclass
class Case:
    """One catalogue entry.

    Attributes:
        id: Short name (the test id and the README row).
        what: The user's mistake, in words (the README's first column).
        argv: The command after ``cs336``; ``{data}``, ``{ckpt}``, ``{cs336}``, ``{inputs}``, ``{work}`` are filled in.
        expect: Fragments the one error line must contain (the problem, then the fix).
        setup: Writes the bad input under ``Inputs.inputs`` / corrupts ``Inputs.data`` before the command runs.
        subprocess: Run as ``python -m lightning_cs336`` instead of in-process.
        lead: Not fixed yet, the fix lies outside this module's owner's files: the test is a strict xfail saying why.
    """

    id: str
    what: str
    argv: list[str]
    expect: tuple[str, ...]
    setup: Callable[[Inputs], None] | None = None
    subprocess: bool = False
    lead: str | None = None


def _fit(*extra: str, command: str = "fit") -> list[str]:
    """``cs336 fit`` of configs/debug.yaml on the case's data, everything written under the working dir."""
    return [
        command,
        "--config",
        DEBUG,
        "--data.data_dir",
        "{data}",
        "--trainer.default_root_dir",
        "{work}/runs",
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


# ---- setups ---------------------------------------------------------------------------------------------------------


def _write(name: str, text: str) -> Callable[[Inputs], None]:
    def setup(ctx: Inputs) -> None:
        (ctx.inputs / name).write_text(text)

    return setup


def _write_bytes(name: str, data: bytes) -> Callable[[Inputs], None]:
    def setup(ctx: Inputs) -> None:
        path = ctx.inputs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return setup


def _data(change: Callable[[Path], None]) -> Callable[[Inputs], None]:
    def setup(ctx: Inputs) -> None:
        change(ctx.data)

    return setup


def _meta(**changes: object) -> Callable[[Path], None]:
    def change(d: Path) -> None:
        meta = json.loads((d / "meta.json").read_text())
        meta.update(changes)
        (d / "meta.json").write_text(json.dumps(meta))

    return change


def _truncate_bin(d: Path) -> None:
    path = d / "train.bin"
    path.write_bytes(path.read_bytes()[:-1])  # half a uint16 token at the end: a copy cut short


def _corrupt_ckpt(ctx: Inputs) -> None:
    # The first 4 KiB of a real checkpoint: what an interrupted copy or download leaves.
    (ctx.inputs / "bad.ckpt").write_bytes(ctx.ckpt.read_bytes()[:4096])


def _cs336_other_shape(ctx: Inputs) -> None:
    """A CS336 file whose second layer is narrower than the first: no single architecture has these shapes."""
    import torch

    raw = torch.load(ctx.cs336, map_location="cpu", weights_only=True)
    raw["model"]["layers.1.ffn.w1.weight"] = raw["model"]["layers.1.ffn.w1.weight"][:48]
    torch.save(raw, ctx.inputs / "other.pt")


def _bigger_tokenizer(ctx: Inputs) -> None:
    """A BPE tokenizer of 277 ids, for a model of the byte-level 257."""
    from lightning_cs336.data import Tokenizer

    Tokenizer.train_bpe(["some text " * 50, "more words here " * 50], 300).save(ctx.inputs / "big.json")


def _import_without_tokenizer(ctx: Inputs) -> None:
    from lightning_cs336.cs336_format import import_cs336_checkpoint

    import_cs336_checkpoint(ctx.cs336, ctx.inputs / "bare.ckpt", num_heads=2, context_length=32)


def _empty_dir(name: str) -> Callable[[Inputs], None]:
    def setup(ctx: Inputs) -> None:
        (ctx.inputs / name).mkdir()

    return setup


_BASE_FIT = _fit()

CASES: list[Case] = [
    # ---- configs
    Case(
        "config-wrong-key",
        "misspelt key in a config file (`d_modle`)",
        [*_BASE_FIT, "--config", "{inputs}/bad.yaml"],
        ("d_modle", "--help"),
        _write("bad.yaml", "model:\n  d_modle: 64\n"),
    ),
    Case(
        "option-wrong-key",
        "misspelt option (`--trainer.max_step`)",
        [*_BASE_FIT, "--trainer.max_step", "3"],
        ("max_step", "--help"),
    ),
    Case(
        "config-wrong-type",
        "a value of the wrong type (`d_model: sixty-four`)",
        [*_BASE_FIT, "--config", "{inputs}/bad.yaml"],
        ("d_model", "sixty-four", "--help"),
        _write("bad.yaml", "model:\n  d_model: sixty-four\n"),
    ),
    Case(
        "model-shape",
        "d_model not divisible by num_heads",
        [*_BASE_FIT, "--model.num_heads", "3"],
        ("divisible by num_heads",),
    ),
    Case(
        "config-missing",
        "--config of a file that does not exist",
        [*_fit()[:2], "{inputs}/nope.yaml", *_fit()[3:]],
        ("nope.yaml", "does not exist", "--config PATH"),
    ),
    Case(
        "config-empty",
        "an empty config file (and no --trainer.max_steps)",
        ["fit", "--config", "{inputs}/empty.yaml", "--trainer.default_root_dir", "{work}/runs"],
        ("empty.yaml", "empty"),
        _write("empty.yaml", ""),
    ),
    Case(
        "config-yaml-syntax",
        "a YAML syntax error",
        [*_BASE_FIT, "--config", "{inputs}/bad.yaml"],
        ("bad.yaml", "line"),
        _write("bad.yaml", "model:\n  d_model: [64\n  num_heads: 2\n"),
    ),
    Case(
        "max-steps-negative",
        "`--trainer.max_steps -5`",
        [*_BASE_FIT, "--trainer.max_steps", "-5"],
        ("max_steps", "-5"),
    ),
    # ---- data
    Case(
        "data-dir-missing",
        "a data directory that does not exist",
        [*_fit()[:4], "{inputs}/nope", *_fit()[5:]],
        ("nope", "cs336 prepare"),
    ),
    Case(
        "bin-missing",
        "`train.bin` missing",
        _BASE_FIT,
        ("train.bin", "cs336 prepare"),
        _data(lambda d: (d / "train.bin").unlink()),
    ),
    Case(
        "bin-empty",
        "`train.bin` empty",
        _BASE_FIT,
        ("train.bin", "empty", "cs336 prepare"),
        _data(lambda d: (d / "train.bin").write_bytes(b"")),
    ),
    Case(
        "bin-truncated",
        "`train.bin` cut short (odd number of bytes)",
        _BASE_FIT,
        ("train.bin", "truncated", "cs336 prepare"),
        _data(_truncate_bin),
    ),
    Case(
        "meta-dtype",
        "`meta.json` with a dtype the format does not have (`float32`)",
        _BASE_FIT,
        ("float32", "cs336 prepare"),
        _data(_meta(dtype="float32")),
    ),
    Case(
        "meta-missing",
        "`meta.json` missing",
        _BASE_FIT,
        ("meta.json", "cs336 prepare"),
        _data(lambda d: (d / "meta.json").unlink()),
    ),
    Case(
        "meta-corrupt",
        "`meta.json` not JSON",
        _BASE_FIT,
        ("meta.json", "not valid JSON", "cs336 prepare"),
        _data(lambda d: (d / "meta.json").write_text('{"vocab_size": 257,')),
    ),
    Case(
        "vocab-mismatch",
        "token ids beyond the vocabulary (`meta.json` says 200, the data has bytes up to 256)",
        _BASE_FIT,
        ("vocab_size", "cs336 prepare"),
        _data(_meta(vocab_size=200)),
    ),
    Case(
        "vocab-option",
        "`--model.vocab_size` smaller than the data's",
        [*_BASE_FIT, "--model.vocab_size", "100"],
        ("vocab_size", "cs336 prepare"),
    ),
    Case(
        "context-too-long",
        "a context longer than the corpus",
        [*_BASE_FIT, "--model.context_length", "100000"],
        ("context_length", "tokens"),
    ),
    # ---- checkpoints
    Case(
        "fit-ckpt-missing",
        "`--ckpt_path` that does not exist",
        [*_BASE_FIT, "--ckpt_path", "{inputs}/missing.ckpt"],
        ("missing.ckpt", "neither an existing file"),
    ),
    Case(
        "fit-ckpt-corrupt",
        "`cs336 fit --ckpt_path` of a truncated checkpoint",
        [*_BASE_FIT, "--ckpt_path", "{inputs}/bad.ckpt"],
        ("bad.ckpt",),
        _corrupt_ckpt,
        subprocess=True,
    ),
    Case(
        "validate-ckpt-corrupt",
        "`cs336 validate --ckpt_path` of a truncated checkpoint",
        [*_fit(command="validate"), "--ckpt_path", "{inputs}/bad.ckpt"],
        ("bad.ckpt",),
        _corrupt_ckpt,
        subprocess=True,
    ),
    Case(
        "fit-ckpt-architecture",
        "`--ckpt_path` of a checkpoint whose model differs from the config's (`--model.d_model 64`)",
        [*_BASE_FIT, "--model.d_model", "64", "--ckpt_path", "{ckpt}"],
        ("d_model",),
        subprocess=True,
    ),
    Case(
        "generate-ckpt-corrupt",
        "`cs336 generate` of a truncated checkpoint",
        ["generate", "--ckpt", "{inputs}/bad.ckpt"],
        ("bad.ckpt",),
        _corrupt_ckpt,
    ),
    Case(
        "generate-cs336-file",
        "`cs336 generate` of a CS336-format file (not a Lightning checkpoint)",
        ["generate", "--ckpt", "{cs336}"],
        ("import-cs336",),
    ),
    Case(
        "export-ckpt-corrupt",
        "`cs336 export-cs336` of a truncated checkpoint",
        ["export-cs336", "--ckpt", "{inputs}/bad.ckpt", "--out", "{work}/model.pt"],
        ("bad.ckpt",),
        _corrupt_ckpt,
    ),
    Case(
        "import-other-shape",
        "`cs336 import-cs336` of a CS336 file whose layers differ in shape",
        [
            "import-cs336",
            "--src",
            "{inputs}/other.pt",
            "--out",
            "{work}/m.ckpt",
            "--num-heads",
            "2",
            "--context-length",
            "32",
        ],
        ("layers.1.ffn.w1.weight", "export it again"),
        _cs336_other_shape,
    ),
    Case(
        "import-num-heads",
        "`cs336 import-cs336 --num-heads` that does not divide d_model",
        ["import-cs336", "--src", "{cs336}", "--out", "{work}/m.ckpt", "--num-heads", "3", "--context-length", "32"],
        ("num_heads", "--num-heads"),
    ),
    Case(
        "import-not-cs336",
        "`cs336 import-cs336` of a file that is not a checkpoint",
        [
            "import-cs336",
            "--src",
            "{inputs}/notes.txt",
            "--out",
            "{work}/m.ckpt",
            "--num-heads",
            "2",
            "--context-length",
            "32",
        ],
        ("notes.txt",),
        _write("notes.txt", "not a checkpoint\n"),
    ),
    Case(
        "import-tokenizer-vocab",
        "`cs336 import-cs336 --tokenizer` of a tokenizer larger than the model's vocabulary",
        [
            "import-cs336",
            "--src",
            "{cs336}",
            "--out",
            "{work}/m.ckpt",
            "--num-heads",
            "2",
            "--context-length",
            "32",
            "--tokenizer",
            "{inputs}/big.json",
        ],
        ("tokenizer has 277 ids", "vocab_size=257", "--tokenizer"),
        _bigger_tokenizer,
    ),
    # ---- prepare
    Case(
        "prepare-empty-dir",
        "`cs336 prepare` of an empty directory",
        ["prepare", "{inputs}/empty", "--out", "{work}/data", "--no-progress"],
        ("empty",),
        _empty_dir("empty"),
    ),
    Case(
        "prepare-missing",
        "`cs336 prepare` of a file that does not exist",
        ["prepare", "{inputs}/missing.txt", "--out", "{work}/data", "--no-progress"],
        ("missing.txt",),
    ),
    Case(
        "prepare-binary",
        "`cs336 prepare` of binary data",
        ["prepare", "{inputs}/blob.bin", "--out", "{work}/data", "--no-progress"],
        ("blob.bin", "UTF-8"),
        _write_bytes("blob.bin", bytes(range(256)) * 64),
    ),
    # ---- sampling options
    Case(
        "generate-temperature",
        "`cs336 generate --temperature -1`",
        ["generate", "--ckpt", "{ckpt}", "--temperature", "-1"],
        ("--temperature -1", ">= 0"),
    ),
    Case(
        "generate-top-p",
        "`cs336 generate --top-p 2`",
        ["generate", "--ckpt", "{ckpt}", "--top-p", "2"],
        ("--top-p 2", "(0, 1]"),
    ),
    Case(
        "generate-top-k",
        "`cs336 generate --top-k 0` (there is no top-k sampling)",
        ["generate", "--ckpt", "{ckpt}", "--top-k", "0"],
        ("--top-k", "--help"),
    ),
    Case(
        "generate-max-new-tokens",
        "`cs336 generate --max-new-tokens -1`",
        ["generate", "--ckpt", "{ckpt}", "--max-new-tokens", "-1"],
        ("--max-new-tokens -1", "at least 1"),
    ),
    Case(
        "generate-no-tokenizer",
        "`cs336 generate` of a checkpoint imported without a tokenizer",
        ["generate", "--ckpt", "{inputs}/bare.ckpt"],
        ("tokenizer", "--tokenizer"),
        _import_without_tokenizer,
    ),
]


def _params() -> list:
    params = []
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=f"lead: {case.lead}")] if case.lead else []
        if case.subprocess:
            marks.append(pytest.mark.slow)
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


# ---- running a case -------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    leftovers: list[str]


def _fill(argv: list[str], ctx: Inputs, work: Path) -> list[str]:
    values = {"data": ctx.data, "ckpt": ctx.ckpt, "cs336": ctx.cs336, "inputs": ctx.inputs, "work": work}
    return [a.format(**values) for a in argv]


def _leftovers(work: Path, wandb_dir: Path) -> list[str]:
    left = [str(p.relative_to(work)) for p in sorted(work.rglob("*"))]
    left += [f"WANDB_DIR/{p.relative_to(wandb_dir)}" for p in sorted(wandb_dir.rglob("*")) if "run-" in p.name]
    return left


def _environment(wandb_root: Path) -> dict[str, str]:
    """A ``cs336`` subprocess's environment: W&B offline and quiet, every W&B directory under ``wandb_root``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "CS336_TRACEBACK"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DISABLE_GIT="true", OMP_NUM_THREADS="1")
    for var, sub in (("WANDB_DIR", "dir"), ("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache")):
        (wandb_root / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(wandb_root / sub)
    return env


def start_case(case: Case, ctx: Inputs, work: Path, wandb_root: Path) -> subprocess.Popen:
    """Set ``case`` up and start it as ``python -m lightning_cs336`` in the empty directory ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    if case.setup is not None:
        case.setup(ctx)
    return subprocess.Popen(
        [sys.executable, "-m", "lightning_cs336", *_fill(case.argv, ctx, work)],
        cwd=work,
        env=_environment(wandb_root),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_case(case: Case, ctx: Inputs, work: Path, wandb_dir: Path, capfd: pytest.CaptureFixture) -> Outcome:
    """Run ``case`` in-process in the empty directory ``work``; return its exit status, output and leftovers."""
    work.mkdir(parents=True, exist_ok=True)
    if case.setup is not None:
        case.setup(ctx)
    argv = _fill(case.argv, ctx, work)
    env_trace = os.environ.pop("CS336_TRACEBACK", None)
    old = os.getcwd()
    os.chdir(work)
    capfd.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException as e:  # an exception escaping main is a traceback for the user: record it as one
        import traceback

        code = 1
        traceback.print_exception(e)
    finally:
        os.chdir(old)
        _at_exit()
        if env_trace is not None:
            os.environ["CS336_TRACEBACK"] = env_trace
    out, err = capfd.readouterr()
    return Outcome(code, out, err, _leftovers(work, wandb_dir))


def _at_exit() -> None:
    """What the end of a ``cs336`` process does that matters here: release the run directories it claimed but never
    wrote into (``experiment``'s atexit hook), and end a W&B run left open."""
    from lightning_cs336 import experiment

    experiment.release_claims()
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def error_lines(text: str) -> list[str]:
    """The lines of ``text`` that report an error (``... error: ...``)."""
    return [line for line in text.splitlines() if re.search(r"\berror:", line, re.IGNORECASE)]


def check(case: Case, outcome: Outcome) -> None:
    """The catalogue's four rules: one line naming the problem and the fix, no traceback, exit != 0, no output."""
    both = outcome.out + outcome.err
    assert "Traceback" not in both, both[-3000:]
    lines = error_lines(outcome.err)
    assert len(lines) == 1, f"expected one error line, got {lines}\n{outcome.err[-3000:]}"
    assert lines[0].startswith("cs336: error:"), lines[0]
    for fragment in case.expect:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert outcome.code == 2, f"exit status {outcome.code}\n{outcome.err[-2000:]}"
    assert outcome.leftovers == [], f"partial output left behind: {outcome.leftovers}"


# ---- fixtures and the test ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> tuple[Path, Path]:
    """A 2-step `cs336 fit` checkpoint of configs/debug.yaml (in-process) and its CS336 export."""
    work = tmp_path_factory.mktemp("bad_input_fit")
    mp = pytest.MonkeyPatch()
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(work / "wandb"), "WANDB_SILENT": "true"}.items():
        mp.setenv(key, value)
    old = os.getcwd()
    os.chdir(work)
    try:
        argv = [a.format(data=tiny_data, work=work) for a in _fit("--trainer.max_steps", "2", "--no-wandb")]
        try:
            main(argv)
        except SystemExit as exit_:
            assert not exit_.code, f"the fixture's fit failed with exit status {exit_.code}"
    finally:
        os.chdir(old)
        mp.undo()
    found = sorted(work.rglob("last.ckpt"))  # where the config puts it: the run directory's checkpoints/
    assert found, "the fixture's fit wrote no last.ckpt"
    ckpt = found[0]
    cs336 = work / "model.pt"
    from lightning_cs336.cs336_format import export_cs336_checkpoint

    export_cs336_checkpoint(ckpt, cs336)
    return ckpt, cs336


def _case_inputs(root: Path, tiny_data: Path, trained: tuple[Path, Path]) -> Inputs:
    (root / "inputs").mkdir(parents=True)
    shutil.copytree(tiny_data, root / "inputs" / "data")
    return Inputs(root / "inputs", root / "inputs" / "data", *trained)


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, trained: tuple[Path, Path]) -> dict:
    """Every subprocess case, started at once (each spends 10-30 s importing torch and lightning; in parallel they
    share that wait). By id: the process, its working dir and its W&B dir."""
    procs = {}
    for case in CASES:
        if case.subprocess:
            root = tmp_path_factory.mktemp(f"bad_input_{case.id}")
            ctx = _case_inputs(root, tiny_data, trained)
            procs[case.id] = (start_case(case, ctx, root / "work", root / "wandb"), root / "work", root / "wandb")
    yield procs
    for proc, _, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def inputs(tmp_path: Path, tiny_data: Path, trained: tuple[Path, Path], launched: dict) -> Inputs:
    """The case's inputs dir, with its own copy of the tiny corpus. (``launched``: the subprocess cases are started
    before the first in-process one, so that they run while it does.)"""
    return _case_inputs(tmp_path, tiny_data, trained)


@pytest.mark.parametrize("case", _params())
def test_bad_input(case: Case, request: pytest.FixtureRequest, tmp_path: Path, wandb_env: Path) -> None:
    if case.subprocess:
        proc, work, wandb_root = request.getfixturevalue("launched")[case.id]
        out, err = proc.communicate(timeout=600)
        outcome = Outcome(proc.returncode, out, err, _leftovers(work, wandb_root))
    else:
        ctx = request.getfixturevalue("inputs")
        outcome = run_case(case, ctx, tmp_path / "work", wandb_env, request.getfixturevalue("capfd"))
    lines = error_lines(outcome.err) or outcome.err.strip().splitlines()[-1:]
    # For the README table (`python tests/test_bad_input.py`): the line as the user sees it, directories dropped.
    SEEN[case.id] = re.sub(r"(?<![\w.])/(?:[^\s/`'\"]+/)+", "", lines[0]) if lines else ""
    check(case, outcome)


def test_catalogue_covers_the_issue() -> None:
    """At least 24 distinct cases, ids unique: the README table is generated from this list."""
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 24


# ---- the README table -----------------------------------------------------------------------------------------------


def readme_table(seen: dict[str, str] | None = None) -> str:
    """The catalogue as a markdown table: case | what the user sees.

    Args:
        seen: The error line each case printed (by id), e.g. from running the catalogue; without it, the fragments the
            test requires of that line are shown.
    """
    rows = ["| bad input | what the user sees (exit status 2, nothing written) |", "|---|---|"]
    for case in CASES:
        shown = (seen or {}).get(case.id) or " … ".join(f"`{f}`" for f in case.expect)
        status = " (not yet: " + case.lead + ")" if case.lead else ""
        rows.append(f"| {case.what} | {shown.replace('|', '/')}{status} |")
    return "\n".join(rows)


if __name__ == "__main__":  # run the catalogue and print the table with the lines users see
    code = pytest.main([__file__, "-q", "-p", "no:cacheprovider", "-k", "test_bad_input", *sys.argv[1:]])
    print(readme_table(sys.modules["test_bad_input"].SEEN))
    sys.exit(code)

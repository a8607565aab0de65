"""The ``cs336`` command: LightningCLI for ``fit``/``validate``/``test``, plus ``prepare``, ``generate`` and the CS336
checkpoint converters. One module per command beside this one; this one dispatches and turns bad input into one line.

Usage::

    cs336 prepare stdlib --out data/quickstart           # tokenize the embedded default corpus
    cs336 fit --config configs/quickstart.yaml           # train (W&B offline unless an account is configured)
    cs336 generate --ckpt checkpoints/quickstart/last.ckpt --prompt "def "
    cs336 export-cs336 --ckpt last.ckpt --out model.pt   # to a CS336 {"model","optimizer","iteration"} file
    cs336 import-cs336 --src model.pt --num-heads 16 --context-length 256 --out model.ckpt
"""

from __future__ import annotations

import os
import sys

_EXTRA_COMMANDS = ("prepare", "generate", "export-cs336", "import-cs336", "runs", "ablate", "sweep")


def default_wandb_mode() -> str:
    """Default ``WANDB_MODE`` to ``offline`` unless the user set it or has credentials.

    It goes into the environment (not only ``WandbLogger(offline=True)``): wandb reads its settings from there, and
    with only the code argument its telemetry still tries to reach the network.
    """
    from lightning_cs336.callbacks.wandb_access import has_wandb_credentials

    if "WANDB_MODE" not in os.environ and not has_wandb_credentials():
        os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        print("cs336: no W&B credentials found, logging W&B offline (sync later with `wandb sync`).", file=sys.stderr)
    return os.environ.get("WANDB_MODE", "online")


class _ArtifactError(Exception):
    """Placeholder until the callbacks package (and its ArtifactUnavailableError) is imported."""


class _MisconfigurationError(Exception):
    """Placeholder until Lightning's MisconfigurationException (e.g. ``max_steps -5``) is imported."""


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``cs336`` console script (and ``python -m lightning_cs336``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    global _ArtifactError, _MisconfigurationError
    try:
        from lightning_cs336.callbacks.wandb_access import ArtifactUnavailableError as _ArtifactError

        if command == "prepare":
            from lightning_cs336.cli.prepare import prepare_main

            sys.exit(prepare_main(argv[1:]))
        if command == "generate":
            from lightning_cs336.cli.generate import generate_main

            sys.exit(generate_main(argv[1:]))
        if command == "export-cs336":
            from lightning_cs336.cli.convert import export_main

            sys.exit(export_main(argv[1:]))
        if command == "import-cs336":
            from lightning_cs336.cli.convert import import_main

            sys.exit(import_main(argv[1:]))
        if command == "runs":
            from lightning_cs336.cli.runs import runs_main

            sys.exit(runs_main(argv[1:]))
        if command == "ablate":
            from lightning_cs336.cli.ablate import ablate_main

            sys.exit(ablate_main(argv[1:]))
        if command == "sweep":
            from lightning_cs336.cli.sweep import sweep_main

            sys.exit(sweep_main(argv[1:]))
        # `--no-wandb` (the seed's flag): the same run with local loggers only.
        no_wandb = "--no-wandb" in argv
        argv = [a for a in argv if a != "--no-wandb"]
        default_wandb_mode()
        from lightning.fabric.utilities.exceptions import MisconfigurationException as _MisconfigurationError
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        from lightning_cs336.callbacks.preemption import CheckpointWriteError
        from lightning_cs336.cli.fit import _cli_class
        from lightning_cs336.data import TokenDataModule
        from lightning_cs336.module import LanguageModel

        try:
            cli = _cli_class(no_wandb=no_wandb)(
                LanguageModel,
                TokenDataModule,
                args=argv,
                save_config_kwargs={"overwrite": True},
                parser_kwargs={"epilog": f"Other commands: {', '.join(_EXTRA_COMMANDS)} (each with --help)."},
            )
        except SIGTERMException:
            # Lightning's SIGTERMException is a SystemExit with status 0: a scheduler would read the preempted run as
            # finished. 143 (128 + SIGTERM) is what a process killed by SIGTERM reports.
            from lightning_cs336.experiment import note

            note("stopped by SIGTERM (preempted): the run record says preempted; resume with --ckpt_path last")
            sys.exit(143)
        except CheckpointWriteError as err:
            print(f"cs336: error: {err}", file=sys.stderr)
            sys.exit(1)
        stopped = getattr(cli, "stopped_reason_", None)
        if stopped:
            print(f"cs336: error: {stopped}", file=sys.stderr)
            sys.exit(1)
    except (
        ValueError,
        FileNotFoundError,
        NotADirectoryError,
        PermissionError,
        _ArtifactError,
        _MisconfigurationError,
    ) as err:
        # Bad input gets one line naming the problem and the fix; CS336_TRACEBACK=1 shows where it came from.
        from lightning_cs336.experiment import release_claims

        release_claims()  # no empty run directory is left behind
        if os.environ.get("CS336_TRACEBACK"):
            raise
        print(f"cs336: error: {err}", file=sys.stderr)
        sys.exit(2)


def __getattr__(name: str) -> object:
    # `from lightning_cs336.cli import fit_report` keeps working without importing lightning at `cs336 --help` time.
    if name == "fit_report":
        from lightning_cs336.cli.fit import fit_report

        return fit_report
    raise AttributeError(name)


if __name__ == "__main__":
    main()

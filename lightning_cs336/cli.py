"""The ``cs336`` command: LightningCLI for ``fit``/``validate``/``test``, plus ``prepare``, ``generate`` and the CS336
checkpoint converters.

Usage::

    cs336 prepare stdlib --out data/quickstart           # tokenize the embedded default corpus
    cs336 fit --config configs/quickstart.yaml           # train (W&B offline unless an account is configured)
    cs336 generate --ckpt checkpoints/quickstart/last.ckpt --prompt "def "
    cs336 export-cs336 --ckpt last.ckpt --out model.pt   # to a CS336 {"model","optimizer","iteration"} file
    cs336 import-cs336 --src model.pt --num-heads 16 --context-length 256 --out model.ckpt
"""

from __future__ import annotations

import argparse
import netrc
import os
import sys
from pathlib import Path
from typing import Any

_EXTRA_COMMANDS = ("prepare", "generate", "export-cs336", "import-cs336")


def _has_wandb_credentials() -> bool:
    """True when W&B could log online: an API key in the environment or a ``wandb login`` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        path = os.environ.get("NETRC", os.path.expanduser("~/.netrc"))
        hosts = netrc.netrc(path).hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


def default_wandb_mode() -> str:
    """Default ``WANDB_MODE`` to ``offline`` unless the user set it or has credentials.

    It goes into the environment (not only ``WandbLogger(offline=True)``): wandb reads its settings from there, and
    with only the code argument its telemetry still tries to reach the network.
    """
    if "WANDB_MODE" not in os.environ and not _has_wandb_credentials():
        os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        print("cs336: no W&B credentials found, logging W&B offline (sync later with `wandb sync`).", file=sys.stderr)
    return os.environ.get("WANDB_MODE", "online")


def _cli_class() -> type:
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    class QuietParser(LightningArgumentParser):
        """On a bad option or config key print the error and the --help tip, not a 40-line usage dump."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # No prefix matching: a misspelt key (`--trainer.max_step`) must be an error, not silently accepted.
            kwargs.setdefault("allow_abbrev", False)
            super().__init__(*args, **kwargs)

        def print_usage(self, file: Any = None) -> None:
            pass

    class CS336CLI(LightningCLI):
        """LightningCLI with the data/model links and an end-of-fit report."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, parser_class=QuietParser, **kwargs)

        def add_arguments_to_parser(self, parser: Any) -> None:
            # Values given once: the data's window length follows the model's context, and the model's vocabulary
            # comes from the prepared data's tokenizer (known only once the datamodule has read meta.json).
            parser.link_arguments("model.context_length", "data.context_length")
            parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
            parser.add_argument(
                "--validate_first",
                type=bool,
                default=False,
                help="fit only: run validation once before training, so the curves start at the untrained loss",
            )

        def _resolve_ckpt_path(self) -> None:
            # `--ckpt_path` may be a W&B artifact reference (`entity/project/model-<run>:best`): download it first.
            # A path that does not exist fails here, before any run directory or config file is written.
            from lightning_cs336.callbacks import resolve_checkpoint

            kwargs = self.config_init[self.subcommand]
            if kwargs.get("ckpt_path"):
                kwargs["ckpt_path"] = str(resolve_checkpoint(kwargs["ckpt_path"]))

        def before_validate(self) -> None:
            self._resolve_ckpt_path()

        def before_test(self) -> None:
            self._resolve_ckpt_path()

        def before_fit(self) -> None:
            self._resolve_ckpt_path()
            # Skipped on resume: the untrained loss belongs to the run's start, not to the resumed weights.
            if self.config[self.subcommand].get("validate_first") and not self.config_init[self.subcommand].get(
                "ckpt_path"
            ):
                self.initial_metrics = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)[0]

        def after_fit(self) -> None:
            if self.trainer.is_global_zero:
                print(fit_report(self.trainer, self.model, initial=getattr(self, "initial_metrics", None)))

    return CS336CLI


def fit_report(
    trainer: Any,
    module: Any,
    initial: dict[str, float] | None = None,
    prompt: str | None = None,
    max_new_tokens: int = 80,
) -> str:
    """Where the run's records are, a sample from the trained model, and how to view the run."""
    import torch

    lines = ["", "=" * 80, "cs336: training finished"]
    final = trainer.callback_metrics.get("val/loss")
    if final is not None:
        start = f"{initial['val/loss']:.4f} before training -> " if initial and "val/loss" in initial else ""
        lines.append(f"  val/loss:     {start}{float(final):.4f} at step {trainer.global_step}")
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and (ckpt.best_model_path or ckpt.last_model_path):
        lines.append(f"  checkpoints:  {Path(ckpt.dirpath).resolve()}")
        if ckpt.best_model_path:
            score = f" ({ckpt.monitor}={float(ckpt.best_model_score):.4f})" if ckpt.best_model_score is not None else ""
            lines.append(f"    best:       {ckpt.best_model_path}{score}")
        if ckpt.last_model_path:
            lines.append(f"    last:       {ckpt.last_model_path}")
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            run_dir = Path(logger.experiment.dir).parent.resolve()
            lines.append(f"  W&B run:      {run_dir}")
            if os.environ.get("WANDB_MODE") == "offline":
                lines.append(f"    view it:    wandb sync {run_dir}   (uploads the offline run to wandb.ai)")
            else:
                lines.append(f"    view it:    {getattr(logger.experiment, 'url', '')}")
        elif getattr(logger, "log_dir", None):
            lines.append(f"  {type(logger).__name__}: {Path(logger.log_dir).resolve()}")
    # One process only: with several ranks (FSDP shards the weights) a rank-zero forward would hang or be wrong.
    if trainer.world_size == 1 and getattr(module, "tokenizer", None) is not None and hasattr(module, "generate_text"):
        prompt = prompt if prompt is not None else "def "
        generator = torch.Generator(device=module.device).manual_seed(0)
        text = module.generate_text(prompt, max_new_tokens, temperature=0.8, top_p=0.95, generator=generator)
        lines += ["  sample (temperature 0.8, top-p 0.95):", "  " + "-" * 40]
        lines += ["  " + line for line in (prompt + text).splitlines()[:20]]
        lines.append("  " + "-" * 40)
    lines.append("=" * 80)
    return "\n".join(lines)


def generate_main(argv: list[str]) -> int:
    """``cs336 generate``: sample text from a checkpoint written by ``cs336 fit``."""
    parser = argparse.ArgumentParser(prog="cs336 generate", description="Sample text from a trained checkpoint.")
    parser.add_argument(
        "--ckpt",
        required=True,
        help="a .ckpt written by `cs336 fit` (or `cs336 import-cs336`), or a W&B artifact such as ENTITY/PROJECT/"
        "model-RUN:best",
    )
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    import torch

    from lightning_cs336.callbacks import resolve_checkpoint
    from lightning_cs336.module import LanguageModel

    # A local path, or a W&B artifact reference such as `entity/project/model-<run>:best` (needs network and a key).
    path = Path(resolve_checkpoint(args.ckpt))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: pass a .ckpt written by `cs336 fit`")
    module = LanguageModel.load_from_checkpoint(path, map_location=args.device)
    if module.tokenizer is None:
        raise ValueError(f"checkpoint {path} holds no tokenizer: it was not written by `cs336 fit`")
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    for i in range(args.num_samples):
        text = module.generate_text(
            args.prompt, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, generator=generator
        )
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(args.prompt + text)
    return 0


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cs336 export-cs336", description="Lightning .ckpt -> CS336 checkpoint.")
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from lightning_cs336.module import export_cs336_checkpoint

    if not Path(args.ckpt).is_file():
        raise FileNotFoundError(f"checkpoint {args.ckpt} does not exist")
    print(export_cs336_checkpoint(args.ckpt, args.out))
    return 0


def import_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cs336 import-cs336", description="CS336 checkpoint -> Lightning .ckpt.")
    parser.add_argument("--src", required=True, help="a torch.save'd {'model','optimizer','iteration'} file")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-heads", type=int, required=True, help="not recoverable from shapes")
    parser.add_argument("--context-length", type=int, required=True)
    parser.add_argument("--rope-theta", type=float, default=10000.0)
    args = parser.parse_args(argv)
    from lightning_cs336.module import import_cs336_checkpoint

    if not Path(args.src).is_file():
        raise FileNotFoundError(f"CS336 checkpoint {args.src} does not exist")
    print(import_cs336_checkpoint(args.src, args.out, args.num_heads, args.context_length, args.rope_theta))
    return 0


class _ArtifactError(Exception):
    """Placeholder until the callbacks package (and its ArtifactUnavailableError) is imported."""


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``cs336`` console script (and ``python -m lightning_cs336``)."""
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    global _ArtifactError
    try:
        from lightning_cs336.callbacks.checkpoint_artifacts import ArtifactUnavailableError as _ArtifactError

        if command == "prepare":
            from lightning_cs336.data import prepare_main

            sys.exit(prepare_main(argv[1:]))
        if command == "generate":
            sys.exit(generate_main(argv[1:]))
        if command == "export-cs336":
            sys.exit(export_main(argv[1:]))
        if command == "import-cs336":
            sys.exit(import_main(argv[1:]))
        default_wandb_mode()
        from lightning_cs336.data import TokenDataModule
        from lightning_cs336.module import LanguageModel

        _cli_class()(
            LanguageModel,
            TokenDataModule,
            args=None if from_sys else argv,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"epilog": f"Other commands: {', '.join(_EXTRA_COMMANDS)} (each with --help)."},
        )
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, _ArtifactError) as err:
        # Bad input gets one line naming the problem and the fix; CS336_TRACEBACK=1 shows where it came from.
        if os.environ.get("CS336_TRACEBACK"):
            raise
        print(f"cs336: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""``cs336 fit|validate|test``: LightningCLI with the data/model links and the end-of-fit report."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


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
            from lightning_cs336.callbacks.wandb_access import resolve_checkpoint

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
    from lightning.pytorch.loggers import WandbLogger

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
        if isinstance(logger, WandbLogger):
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

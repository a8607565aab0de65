"""``cs336 fit|validate|test``: LightningCLI with the data/model links and the end-of-fit report."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal, NoReturn, Optional

from lightning_cs336 import experiment


def _cli_class(no_wandb: bool = False) -> type:
    """The ``cs336`` LightningCLI class. ``no_wandb``: ``--no-wandb`` was given (local loggers only)."""
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    class QuietParser(LightningArgumentParser):
        """On a bad option or config key print the error and the --help tip, not a 40-line usage dump."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # No prefix matching: a misspelt key (`--trainer.max_step`) must be an error, not silently accepted.
            kwargs.setdefault("allow_abbrev", False)
            super().__init__(*args, **kwargs)

        def print_usage(self, file: Any = None) -> None:
            pass

        def error(self, message: str, ex: Exception | None = None) -> NoReturn:
            # One line, like every other bad input of `cs336` (jsonargparse prints a tip, the error and its detail
            # on separate lines). Its nested parsers catch the raised error while trying alternatives: let them.
            from jsonargparse._common import debug_mode_active

            if not self.exit_on_error or debug_mode_active():
                super().error(message, ex)
            parser = getattr(ex, "subcommand_parser", None) or self
            prog = parser.prog.replace(" [options]", "").replace("__main__.py", "cs336")
            text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
            sys.stderr.write(f"cs336: error: {text} (see `{prog} --help`)\n")
            self.exit(2)

    class CS336CLI(LightningCLI):
        """LightningCLI with the data/model links and an end-of-fit report."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, parser_class=QuietParser, **kwargs)

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            # No `predict`: LanguageModel has no predict_step, so the command would only crash (use `cs336 generate`).
            commands = dict(LightningCLI.subcommands())
            commands.pop("predict", None)
            return commands

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
            parser.add_argument(
                "--ckpt_hparams",
                type=Literal["config", "checkpoint"],
                default="config",
                help="fit/validate/test with --ckpt_path: `config` (default) builds the model from the config and "
                "stops with an error naming every model option that differs from the checkpoint's; `checkpoint` "
                "takes the checkpoint's model options instead (needs a checkpoint file, not `last`)",
            )
            parser.add_argument(
                "--logging",
                type=Optional[experiment.LoggingConfig],  # noqa: UP045 (jsonargparse resolves this form everywhere)
                default=None,
                help="fit only: the seed's logging block (project_name, experiment_name, tags, ...; see the README). "
                "`logging: null` or `cs336 fit --no-wandb` logs locally only.",
            )

        def parse_arguments(self, parser: Any, args: Any) -> None:
            # `--print_config` must show what the logging block expands into, so it is handled after the expansion
            # (jsonargparse would print and exit during parsing, before it).
            args = list(sys.argv[1:] if args is None else args)
            _check_config_files(args)
            printing = [a for a in args if a == "--print_config" or a.startswith("--print_config=")]
            self.config = parser.parse_args([a for a in args if a not in printing])
            subcommand = self.config.get("subcommand")
            if subcommand == "fit":
                self._expand_logging(subcommand, claim=not printing)
            if printing:
                print(self._subcommand_parsers[subcommand].dump(self.config[subcommand], skip_none=False), end="")
                sys.exit(0)

        def _expand_logging(self, subcommand: str, claim: bool) -> None:
            subparser = self._subcommand_parsers[subcommand]
            values = self.config[subcommand].clone().as_dict()
            config_files = values.pop("config", None)
            trainer = values.get("trainer") or {}
            if not config_files and trainer.get("max_steps", -1) in (-1, None) and trainer.get("max_epochs") is None:
                raise ValueError(
                    "cs336 fit without --config would train forever with no validation: pass --config "
                    "configs/quickstart.yaml (or another config), or at least --trainer.max_steps N"
                )
            block = values.get("logging")
            null_block = block is None and _block_is_null(config_files)
            # `logging: null`: the block's defaults (the whole suite) with local loggers only, like --no-wandb.
            expanded, self.run_info_ = experiment.expand_fit_config(
                values,
                {} if null_block else block,
                no_wandb or null_block,
                resume=bool(values.get("ckpt_path")),
                claim=claim,
                ckpt_path=values.get("ckpt_path"),
            )
            if claim:
                _wandb_fallback(self.run_info_)
            namespace = subparser.parse_object(expanded)
            if config_files is not None:
                namespace["config"] = self.config[subcommand].get("config")
            self.config[subcommand] = namespace

        def _parse_ckpt_path(self) -> None:
            # LightningCLI replaces the config's model options with the checkpoint's, silently (a `--model.d_model 64`
            # given on the command line is dropped). Only when asked; otherwise before_fit compares them.
            subcommand = self.config.get("subcommand")
            if subcommand and self.config[subcommand].get("ckpt_hparams") == "checkpoint":
                super()._parse_ckpt_path()

        def _resolve_ckpt_path(self) -> None:
            # `--ckpt_path` may be a W&B artifact reference (`entity/project/model-<run>:best`): download it first.
            # A path that does not exist fails here, before any run directory or config file is written.
            from lightning_cs336.callbacks.wandb_access import resolve_checkpoint

            kwargs = self.config_init[self.subcommand]
            if kwargs.get("ckpt_path"):
                kwargs["ckpt_path"] = str(resolve_checkpoint(kwargs["ckpt_path"]))
                if kwargs["ckpt_path"] == "last":
                    kwargs["ckpt_path"] = _newest_last(self.trainer) or "last"
                if os.path.isfile(kwargs["ckpt_path"]):
                    _check_resume(self.trainer, self.model, kwargs["ckpt_path"], self.subcommand,
                                  self.config[self.subcommand].get("ckpt_hparams") == "checkpoint")  # fmt: skip

        def before_validate(self) -> None:
            self._resolve_ckpt_path()

        def before_test(self) -> None:
            self._resolve_ckpt_path()

        def before_fit(self) -> None:
            self._resolve_ckpt_path()
            self._record_identity()
            # Skipped on resume: the untrained loss belongs to the run's start, not to the resumed weights.
            if self.config[self.subcommand].get("validate_first") and not self.config_init[self.subcommand].get(
                "ckpt_path"
            ):
                self.initial_metrics = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)[0]

        def after_fit(self) -> None:
            # A callback that stopped the run on purpose (a loss spike, NaN) says why: the command then fails.
            reasons = [getattr(cb, "stopped_reason", None) for cb in self.trainer.callbacks]
            self.stopped_reason_ = next((r for r in reasons if r), None)
            if self.stopped_reason_:
                from lightning_cs336.record import RunRecord

                for logger in self.trainer.loggers:
                    if isinstance(logger, RunRecord):
                        logger.set_state("failed", self.stopped_reason_)
                return
            if self.trainer.is_global_zero:
                print(fit_report(self.trainer, self.model, initial=getattr(self, "initial_metrics", None)))

        def _record_identity(self) -> None:
            """The run record's identity: resolved config, git commit, the W&B run id; ``log_code``."""
            from lightning.pytorch.loggers import WandbLogger

            from lightning_cs336.callbacks._base import git_state
            from lightning_cs336.record import RunRecord

            if not self.trainer.is_global_zero:
                return
            records = [lg for lg in self.trainer.loggers if isinstance(lg, RunRecord)]
            wandb_loggers = [lg for lg in self.trainer.loggers if isinstance(lg, WandbLogger)]
            info = getattr(self, "run_info_", {})
            for record in records:
                config = self.config[self.subcommand].clone().as_dict()
                config.pop("config", None)
                fields: dict[str, Any] = {"config": config, "git_commit": git_state()[0]}
                if wandb_loggers:
                    fields["wandb_run_id"] = wandb_loggers[0].experiment.id
                record.update_identity(**fields)
                if info.get("log_code"):
                    record.set_state("running")  # creates the directory and run.json before the code lands there
                    experiment.save_code(Path(record.log_dir))
            if info.get("log_code") and wandb_loggers:
                wandb_loggers[0].experiment.log_code(str(Path(experiment.__file__).resolve().parent))

    return CS336CLI


def _check_config_files(args: list[str]) -> None:
    """Each ``--config`` file exists and is a YAML mapping, said in one line (jsonargparse's own messages span
    several, and an empty file reads as "Unexpected config"); ``--model.vocab_size`` is refused with the reason."""
    import yaml

    for i, arg in enumerate(args):
        if arg.startswith(("--model.vocab_size", "--model.init_args.vocab_size")):
            raise ValueError(
                "model.vocab_size comes from the prepared data (its meta.json): drop --model.vocab_size, or "
                "prepare the data with another vocabulary (`cs336 prepare ... --vocab-size N`)"
            )
        if arg == "--config" and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"config {path} does not exist: pass --config PATH (e.g. configs/quickstart.yaml)")
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"{path} is not valid YAML ({where}{problem}); fix the syntax") from None
        if data is None:
            raise ValueError(f"{path} is empty: a cs336 fit config needs at least model, data and trainer sections")
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a mapping of cs336 fit options (it holds a {type(data).__name__})")


def _newest_last(trainer: Any) -> str | None:
    """What ``ckpt_path="last"`` resumes: the newest of the ModelCheckpoints' ``last`` files and Lightning's SLURM
    ``hpc_ckpt_N.ckpt`` in the run directory (the same rule as Lightning's, with the requeue checkpoint added)."""
    import glob

    from lightning.pytorch.callbacks import ModelCheckpoint

    candidates: set[str] = set()
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint):
            candidates |= set(cb._find_last_checkpoints(trainer))
    candidates |= set(glob.glob(os.path.join(str(trainer.default_root_dir), "hpc_ckpt_*.ckpt")))
    existing = [c for c in candidates if os.path.isfile(c)]
    return max(existing, key=os.path.getmtime) if existing else None


#: Options that may change on resume: they do not change what the checkpoint holds.
_RESUMABLE_CHANGES = {"compile"}


def _check_resume(trainer: Any, module: Any, ckpt_path: str, subcommand: str, take_checkpoint: bool) -> None:
    """Before anything trains: the checkpoint loads, its model options are the config's, and steps are left.

    Raises:
        ValueError: If the checkpoint is not a Lightning checkpoint, its model options differ from the config's (each
            named), or (fit) it is already at ``max_steps``.
    """
    import torch

    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 (torch raises many kinds for a corrupt file; all mean the same here)
        raise ValueError(
            f"checkpoint {ckpt_path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:120]}): "
            "it is corrupt or not a checkpoint; pass another --ckpt_path (e.g. the run's last.ckpt)"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(
            f"checkpoint {ckpt_path} is not a Lightning checkpoint (no state_dict); a CS336 file needs "
            "`cs336 import-cs336` first"
        )
    saved = ckpt.get("hyper_parameters") or {}
    current = dict(module.hparams)
    differ = [
        f"model.{k}: config {current[k]!r}, checkpoint {saved[k]!r}"
        for k in sorted(set(saved) & set(current))
        if k not in _RESUMABLE_CHANGES and not k.startswith("_") and _norm(saved[k]) != _norm(current[k])
    ]
    if differ and not take_checkpoint:
        raise ValueError(
            f"the config's model differs from the checkpoint's ({'; '.join(differ)}): use the options the "
            "checkpoint was trained with, or pass --ckpt_hparams checkpoint to take the checkpoint's"
        )
    step = int(ckpt.get("global_step", 0))
    if subcommand == "fit" and trainer.max_steps not in (-1, None) and step >= trainer.max_steps:
        raise ValueError(
            f"checkpoint {ckpt_path} is at step {step} and trainer.max_steps is {trainer.max_steps}: nothing left to "
            f"train; pass a larger --trainer.max_steps to continue"
        )


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _block_is_null(config_files: Any) -> bool:
    """Whether a config file says ``logging: null`` (parsed, that is the same None as no block at all)."""
    import yaml

    for path in config_files or []:
        try:
            data = yaml.safe_load(Path(str(path)).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict) and "logging" in data and data["logging"] is None:
            return True
    return False


def _wandb_fallback(info: dict[str, Any]) -> None:
    """When an online W&B run cannot start (no key, no network), log offline, said in one line, within seconds."""
    from lightning_cs336.callbacks.wandb_access import has_wandb_credentials

    if info.get("wandb") is not None:
        experiment.note(f"W&B is off ({info['wandb']}); the run is recorded locally in {info['run_dir']}")
        return
    if os.environ.get("WANDB_MODE", "online").strip().lower() != "online":
        return
    if not has_wandb_credentials():
        reason = "no W&B API key (WANDB_API_KEY unset, no ~/.netrc entry)"
    else:
        ok, where = experiment.wandb_reachable()
        if ok:
            return
        reason = f"W&B server {where} unreachable"
    os.environ["WANDB_MODE"] = "offline"
    experiment.note(
        f"{reason}: logging W&B offline instead; upload later with `wandb sync {Path(info['run_dir']) / 'wandb'}`"
    )


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

    from lightning_cs336.record import RunRecord

    lines = ["", "=" * 80, "cs336: training finished"]
    final = trainer.callback_metrics.get("val/loss")
    if final is not None:
        start = f"{initial['val/loss']:.4f} before training -> " if initial and "val/loss" in initial else ""
        lines.append(f"  val/loss:     {start}{float(final):.4f} at step {trainer.global_step}")
    saving = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    best = next((cb for cb in saving if getattr(cb, "best_model_path", "")), None)
    last = next((cb.last_model_path for cb in saving if getattr(cb, "last_model_path", "")), None)
    if best is not None or last:
        lines.append(f"  checkpoints:  {Path(saving[0].dirpath).resolve()}")
        if best is not None:
            score = f" ({best.monitor}={float(best.best_model_score):.4f})" if best.best_model_score is not None else ""
            lines.append(f"    best:       {best.best_model_path}{score}")
        if last:
            lines.append(f"    last:       {last}")
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and getattr(logger, "failure", None) is not None:
            lines.append(
                f"  W&B run:      stopped at a W&B failure ({type(logger.failure).__name__}); see the run record"
            )
        elif isinstance(logger, WandbLogger):
            run_dir = Path(logger.experiment.dir).parent.resolve()
            lines.append(f"  W&B run:      {run_dir}")
            if os.environ.get("WANDB_MODE") == "offline":
                lines.append(f"    view it:    wandb sync {run_dir}   (uploads the offline run to wandb.ai)")
            else:
                lines.append(f"    view it:    {getattr(logger.experiment, 'url', '')}")
        elif isinstance(logger, RunRecord):
            run_dir = Path(logger.log_dir).resolve()
            lines.append(f"  run record:   {run_dir}")
            lines.append(f"    view it:    cs336 runs list {run_dir.parent}   (and compare, plot: cs336 runs --help)")
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

"""Experiment set-up for ``cs336 fit``: the seed's ``logging:`` block, W&B's environment variables, run names, the
run directory, and the fallback when W&B cannot start. The CLI calls :func:`expand_fit_config` on the parsed config
before anything is instantiated, so ``--print_config`` shows what the block expanded into.

Every ``cs336 fit`` run gets a directory ``<root>/<project>/<run name>/`` (``root`` is ``trainer.default_root_dir``,
``runs`` by default) holding its run record (``run.json``, ``metrics.jsonl``, ``events.jsonl``), its resolved
``config.yaml``, its checkpoints (``checkpoints/``, unless the config names another ``dirpath``), its offline W&B
run (``wandb/``) and, without W&B, a CSV log (``csv/``). Run names are unique within the project (``-2``, ``-3``
are appended), so two runs never share a checkpoint folder.
"""

from __future__ import annotations

import os
import socket
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

__all__ = ["DEFAULT_NAME_TEMPLATE", "LoggingConfig", "expand_fit_config", "render_name", "wandb_reachable"]

#: The seed's run-name style.
DEFAULT_NAME_TEMPLATE = "transformer-{num_layers}L-{d_model}D-lr{max_lr}-bs{batch_size}"

# Lightning's WandbLogger with W&B failures during training turned into one line (lightning_cs336/loggers.py); a
# config's own WandbLogger subclass is kept as it is.
_WANDB = "lightning_cs336.loggers.WandbLogger"
_LIGHTNING_WANDB = (
    "lightning.pytorch.loggers.WandbLogger",
    "lightning.pytorch.loggers.wandb.WandbLogger",
    "WandbLogger",
)
_CALLBACKS = {
    "log_gradient_norms": "lightning_cs336.callbacks.GradientNormMonitor",
    "log_learning_rate": "lightning.pytorch.callbacks.LearningRateMonitor",
    "log_memory_usage": "lightning_cs336.callbacks.MemoryMonitor",
    "log_compute_time": "lightning_cs336.callbacks.SpeedMonitor",
    "log_model": "lightning_cs336.callbacks.CheckpointArtifactLogger",
}
# Added beside them (not switched by a key of their own): the stability guard reads the gradient norm's pass, the
# step-time breakdown is part of compute time.
_COMPANIONS = {
    "log_gradient_norms": "lightning_cs336.callbacks.StabilityMonitor",
    "log_compute_time": "lightning_cs336.callbacks.StepTimeMonitor",
}
_ARTIFACT_CALLBACKS = ("lightning_cs336.callbacks.TextSampleLogger", "lightning_cs336.callbacks.HistogramLogger")


@dataclass
class LoggingConfig:
    """The seed's ``logging:`` block, mapped onto Lightning's loggers, the suite's callbacks and the Trainer."""

    project_name: str | None = None
    """W&B project and the run directory's parent (``<root>/<project>``). Default: ``WANDB_PROJECT``, else cs336."""
    experiment_name: str | None = None
    """Run name, or a template over hyperparameters: any ``model.*``/``data.*`` field (``{num_layers}``,
    ``{d_model}``, ``{max_lr}``, ``{batch_size}``...) and ``{seed}``. Default: the seed's style,
    ``transformer-{num_layers}L-{d_model}D-lr{max_lr}-bs{batch_size}``. Made unique within the project."""
    tags: list[str] = field(default_factory=list)
    """Tags of the W&B run and the run record (plus ``WANDB_TAGS``, comma-separated)."""
    notes: str | None = None
    """Free-text notes of the W&B run and the run record. Default: ``WANDB_NOTES``."""
    entity: str | None = None
    """W&B entity (user or team). Default: ``WANDB_ENTITY``, else your W&B default."""
    log_model: bool = True
    """Upload every checkpoint as a W&B model artifact (``CheckpointArtifactLogger``)."""
    log_code: bool = True
    """Save the package source (``code.zip``) and the resolved config with the run, and ``log_code`` to W&B."""
    log_artifacts: bool = True
    """Log the objects beyond scalars: the text-sample table (``TextSampleLogger``) and histograms."""
    log_training_every: int | None = None
    """Training metrics every N optimizer steps (``trainer.log_every_n_steps``)."""
    log_validation_every: int | None = None
    """Validate every N training batches (``trainer.val_check_interval``, with ``check_val_every_n_epoch: null``)."""
    log_gradient_norms: bool = True
    """Gradient norms (``GradientNormMonitor``: ``grad/*``)."""
    log_learning_rate: bool = True
    """Learning rate (Lightning's ``LearningRateMonitor``: ``lr-*``)."""
    log_memory_usage: bool = True
    """Memory (``MemoryMonitor``: ``memory/*``)."""
    log_compute_time: bool = True
    """Step time, throughput, MFU (``SpeedMonitor``: ``time/*``, ``throughput/*``)."""


# ------------------------------------------------------------------------------------------------------ helpers


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def wandb_disabled(env: os._Environ[str] | dict[str, str] = os.environ) -> str | None:
    """Why W&B is off by the environment (``WANDB_DISABLED=true`` or ``WANDB_MODE=disabled``), or None."""
    if _truthy(env.get("WANDB_DISABLED")):
        return "WANDB_DISABLED=true"
    if (env.get("WANDB_MODE") or "").strip().lower() == "disabled":
        return "WANDB_MODE=disabled"
    return None


def wandb_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether W&B's server answers a TCP connection within ``timeout`` seconds: ``(ok, host:port)``.

    wandb itself waits up to its 90 s ``init_timeout`` and then raises; this probe decides in seconds whether an
    online run can start, so the CLI can fall back to offline logging with one line instead.
    """
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host = url.hostname or "api.wandb.ai"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, f"{host}:{port}"
    except OSError:
        return False, f"{host}:{port}"


def render_name(template: str, values: dict[str, Any]) -> str:
    """Fill a run-name template; an unknown field is an error naming the fields that exist."""
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    missing = [name for name in fields if name not in values]
    if missing:
        raise ValueError(
            f"logging.experiment_name {template!r} uses unknown field(s) {missing}; known: {sorted(values)}"
        )
    name = template.format(**values)
    return "".join(c if c.isalnum() or c in "-_.=+" else "-" for c in name).strip("-.") or "run"


def _unique(parent: Path, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``... : the first that no run in ``parent`` uses yet (nothing is created)."""
    for i in range(1, 10_000):
        candidate = name if i == 1 else f"{name}-{i}"
        if not (parent / candidate).exists():
            return candidate
    raise ValueError(f"more than 10000 runs named {name!r} in {parent}: choose another logging.experiment_name")


def _claim(parent: Path, name: str) -> str:
    """Like :func:`_unique`, but takes the name with an exclusive ``mkdir``, so two runs started at the same instant
    never get the same directory. The empty directory is removed again at exit when the run never wrote into it
    (bad input found later leaves nothing behind)."""
    import atexit

    if not _CLAIMED:
        atexit.register(release_claims)
    created = []  # the folders made here, deepest first, so that a release removes them all again
    probe = parent.absolute()
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        candidate = _unique(parent, name)
        try:
            (parent / candidate).mkdir()
        except FileExistsError:
            continue  # another run took it between the look and the mkdir: look again
        _CLAIMED.extend([parent / candidate, *created])
        return candidate


_CLAIMED: list[Path] = []


def release_claims() -> None:
    """Remove the run directories this process claimed and never wrote into (the CLI calls it on bad input)."""
    while _CLAIMED:
        try:
            _CLAIMED.pop(0).rmdir()  # only when empty: a run that wrote anything keeps its directory
        except OSError:
            pass


def _rank() -> int:
    """This process's rank from the launcher's environment (0 before any launcher ran)."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        value = os.environ.get(key)
        if value and value.isdigit() and (key != "SLURM_PROCID" or "SLURM_NTASKS" in os.environ):
            if int(value):
                return int(value)
    return 0


def _run_of_checkpoint(ckpt_path: str | None) -> Path | None:
    """The run directory a checkpoint file belongs to (``<run>/checkpoints/x.ckpt`` with ``<run>/run.json``)."""
    if not ckpt_path or not os.path.isfile(ckpt_path):
        return None
    run_dir = Path(ckpt_path).resolve().parent.parent
    return run_dir if (run_dir / "run.json").is_file() else None


def _recorded_wandb_id(run_dir: Path) -> str | None:
    import json

    try:
        return json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("wandb_run_id") or None
    except (OSError, ValueError):
        return None


def _check_writable(path: Path, what: str) -> None:
    """Fail now, before training, when ``path`` cannot be created or written (without creating anything)."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not (probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)):
        raise PermissionError(
            f"{what} {path} is not writable ({probe} is not a writable directory): "
            "pass a writable --trainer.default_root_dir"
        )


def _class(entry: Any) -> str:
    return str(entry.get("class_path", "")) if isinstance(entry, dict) else ""


def _short(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


# ------------------------------------------------------------------------------------------------------ expansion


def expand_fit_config(
    cfg: dict[str, Any],
    block: dict[str, Any] | None,
    no_wandb: bool,
    *,
    resume: bool = False,
    claim: bool = True,
    ckpt_path: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Expand the ``logging:`` block and the W&B environment into the plain Lightning config of ``cs336 fit``.

    Args:
        cfg: The ``fit`` config as a dict (``trainer``, ``model``, ``data``, ...); not modified.
        block: The ``logging:`` block as a dict (the fields of :class:`LoggingConfig`), or None without one.
        no_wandb: ``--no-wandb`` or ``logging: null``: local loggers only.
        resume: A resumed run (``--ckpt_path``): the run keeps its name (and its W&B run) instead of a fresh one.
        claim: Take the run directory (False for ``--print_config``, which must write nothing).
        ckpt_path: The checkpoint resumed from: a file inside a run's ``checkpoints/`` resumes that run.

    Returns:
        The expanded config, and facts for the CLI: ``run_dir``, ``run_name``, ``project``, ``wandb`` (None, or why
        W&B is off), ``log_code``.

    Raises:
        ValueError: If the block and the plain config disagree (naming both), or a template field is unknown.
    """
    cfg = _deep_copy(cfg)
    trainer = cfg.setdefault("trainer", {})
    info: dict[str, Any] = {"wandb": None, "log_code": False}
    b = {**vars(LoggingConfig()), **(block or {})}
    loggers = trainer.get("logger")
    loggers = [] if loggers in (None, True, False) else (loggers if isinstance(loggers, list) else [loggers])
    wandb_entries = [entry for entry in loggers if _class(entry).endswith("WandbLogger")]
    wandb_args = wandb_entries[0].setdefault("init_args", {}) if wandb_entries else {}

    def agree(block_key: str, value: Any, other_name: str, other: Any) -> None:
        if block is not None and block.get(block_key) is not None and other is not None and other != value:
            raise ValueError(
                f"logging.{block_key}={value!r} disagrees with {other_name}={other!r}: set it in one place only"
            )

    # Identity: the block wins, then the plain WandbLogger's arguments, then W&B's environment variables.
    project = b["project_name"] or wandb_args.get("project") or os.environ.get("WANDB_PROJECT") or "cs336"
    agree("project_name", b["project_name"], "trainer.logger WandbLogger project", wandb_args.get("project"))
    agree("entity", b["entity"], "trainer.logger WandbLogger entity", wandb_args.get("entity"))
    entity = b["entity"] or wandb_args.get("entity") or os.environ.get("WANDB_ENTITY")
    tags = list(dict.fromkeys([*b["tags"], *(wandb_args.get("tags") or []), *_env_tags()]))
    notes = b["notes"] or wandb_args.get("notes") or os.environ.get("WANDB_NOTES")
    group = wandb_args.get("group") or os.environ.get("WANDB_RUN_GROUP")

    # Intervals.
    if b["log_training_every"] is not None:
        agree(
            "log_training_every",
            b["log_training_every"],
            "trainer.log_every_n_steps",
            _set(trainer, "log_every_n_steps", 50),
        )
        trainer["log_every_n_steps"] = b["log_training_every"]
    if b["log_validation_every"] is not None:
        agree(
            "log_validation_every",
            b["log_validation_every"],
            "trainer.val_check_interval",
            _set(trainer, "val_check_interval", None),
        )
        trainer["val_check_interval"] = b["log_validation_every"]
        trainer["check_val_every_n_epoch"] = None

    # Callbacks: each switch adds its callback when missing, or removes it; a config that names a callback the
    # block switches off is a disagreement.
    callbacks = list(trainer.get("callbacks") or [])
    if block is not None:
        for key, class_path in _CALLBACKS.items():
            present = [cb for cb in callbacks if _short(_class(cb)) == _short(class_path)]
            if b[key] and not present:
                args = {"logging_interval": "step"} if key == "log_learning_rate" else {}
                callbacks.append({"class_path": class_path, "init_args": args})
                companion = _COMPANIONS.get(key)  # the training-health callbacks that build on this one
                if companion and not any(_short(_class(cb)) == _short(companion) for cb in callbacks):
                    callbacks.append({"class_path": companion})
            elif not b[key] and present and block.get(key) is False:
                raise ValueError(
                    f"logging.{key}=false disagrees with trainer.callbacks, which has {_short(class_path)}"
                )
        if not any(_short(_class(cb)) == "RunInfoLogger" for cb in callbacks):
            callbacks.append({"class_path": "lightning_cs336.callbacks.RunInfoLogger"})
        if not b["log_artifacts"]:
            callbacks = [cb for cb in callbacks if _class(cb) not in _ARTIFACT_CALLBACKS]
    trainer["callbacks"] = callbacks

    # The run: name, unique directory, checkpoint folder.
    root = Path(trainer.get("default_root_dir") or "runs")
    values = _template_values(cfg)
    template = b["experiment_name"] or wandb_args.get("name") or DEFAULT_NAME_TEMPLATE
    agree("experiment_name", b["experiment_name"], "trainer.logger WandbLogger name", wandb_args.get("name"))
    name = render_name(template, values)
    parent = root / project
    resumed_dir = _run_of_checkpoint(ckpt_path) if resume else None
    if resumed_dir is not None:  # `--ckpt_path runs/p/name/checkpoints/last.ckpt`: continue that run
        parent, name = resumed_dir.parent, resumed_dir.name
    if _rank() and os.environ.get("CS336_RUN_NAME"):
        # A process the DDP launcher started for another rank: rank zero chose the name (and made the directory).
        name = os.environ["CS336_RUN_NAME"]
    elif claim:
        _check_writable(parent, "the run directory")
        if not (resume and (parent / name).exists()) and not _rank():
            name = _claim(parent, name)
        os.environ["CS336_RUN_NAME"] = name  # inherited by the processes Lightning launches for the other ranks
    run_dir = parent / name
    # Lightning's own files (SLURM's hpc_ckpt_N.ckpt, profiler output) belong to the run, not a shared folder.
    trainer["default_root_dir"] = str(run_dir)
    plugins = trainer.get("plugins")
    plugins = [] if plugins is None else (list(plugins) if isinstance(plugins, list) else [plugins])
    if not any("CheckpointIO" in _class(p) or "CheckpointIO" in str(p) for p in plugins):
        plugins.append({"class_path": "lightning_cs336.callbacks.preemption.AtomicCheckpointIO"})
    trainer["plugins"] = plugins
    if not any(_short(_class(cb)) == "PreemptionCheckpoint" for cb in callbacks):
        callbacks.append({"class_path": "lightning_cs336.callbacks.preemption.PreemptionCheckpoint"})
    for cb in callbacks:
        if _short(_class(cb)) == "ModelCheckpoint":
            args = cb.setdefault("init_args", {})
            if not args.get("dirpath"):
                args["dirpath"] = str(run_dir / "checkpoints")
            elif claim:
                _check_writable(Path(args["dirpath"]), "ModelCheckpoint dirpath")

    # Loggers: the run record always; W&B unless switched off; CSV when W&B is off.
    off = "--no-wandb" if no_wandb else wandb_disabled()
    if off is None and os.environ.get("WANDB_DIR"):
        try:
            _check_writable(Path(os.environ["WANDB_DIR"]), "WANDB_DIR")
        except PermissionError as err:
            off = f"{err} -- W&B is off for this run"
    others = [entry for entry in loggers if not _class(entry).endswith(("WandbLogger", "RunRecord"))]
    record = {
        "class_path": "lightning_cs336.record.RunRecord",
        "init_args": {"save_dir": str(parent), "name": name, "project": project, "group": group, "tags": tags,
                      "notes": notes, "resume": resume},
    }  # fmt: skip
    # Order matters: Lightning writes LightningCLI's config.yaml into the FIRST logger's save_dir.
    new_loggers: list[dict[str, Any]] = [record]
    if off is None:
        wandb_init = {
            **wandb_args,
            "project": project,
            "name": name,
            # "." is WandbLogger's default, filled in by the parser when the config names none: not a choice.
            "save_dir": wandb_args.get("save_dir")
            if wandb_args.get("save_dir") not in (None, "", ".")
            else str(run_dir),
        }
        wandb_init.update(
            {k: v for k, v in (("entity", entity), ("tags", tags), ("notes", notes), ("group", group)) if v}
        )
        recorded_id = _recorded_wandb_id(run_dir) if resume else None
        if recorded_id and not (wandb_init.get("id") or wandb_init.get("version")):
            wandb_init["id"] = recorded_id  # the resumed run continues its W&B run (WandbLogger: resume="allow")
        own = _class(wandb_entries[0]) if wandb_entries else _WANDB
        new_loggers.insert(0, {"class_path": _WANDB if own in _LIGHTNING_WANDB else own, "init_args": wandb_init})
    else:
        info["wandb"] = off
        if not any(_short(_class(e)) == "CSVLogger" for e in others):
            others.append({"class_path": "lightning.pytorch.loggers.CSVLogger",
                           "init_args": {"save_dir": str(run_dir), "name": "", "version": "csv"}})  # fmt: skip
    trainer["logger"] = new_loggers + others
    info.update(run_dir=run_dir, run_name=name, project=project, log_code=bool(b["log_code"]) and block is not None)
    return cfg, info


def _set(trainer: dict[str, Any], key: str, default: Any) -> Any:
    """The trainer value when the config set it to something other than Lightning's default, else None."""
    value = trainer.get(key)
    return None if value == default else value


def _env_tags() -> list[str]:
    return [t.strip() for t in os.environ.get("WANDB_TAGS", "").split(",") if t.strip()]


def _template_values(cfg: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for section in ("data", "model"):  # model wins on a clash (context_length is in both)
        args = cfg.get(section) or {}
        args = args.get("init_args", args) if isinstance(args, dict) else {}
        values.update({k: v for k, v in args.items() if isinstance(v, (int, float, str, bool))})
    values["seed"] = cfg.get("seed_everything")
    return values


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def save_code(run_dir: Path) -> Path:
    """Zip this package's source into ``run_dir/code.zip`` (what ``log_code`` keeps with the run)."""
    import zipfile

    package = Path(__file__).resolve().parent
    out = run_dir / "code.zip"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(package.rglob("*.py")):
            zf.write(path, path.relative_to(package.parent))
    return out


def note(message: str) -> None:
    """One line to the user on stderr (rank zero only: the launcher's other ranks stay quiet)."""
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0:
        print(f"cs336: {message}", file=sys.stderr)

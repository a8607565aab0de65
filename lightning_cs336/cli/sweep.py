"""``cs336 sweep``: hyperparameter search on Optuna, each trial its own ``cs336 fit`` process, pruned at validations,
the study in a database next to the runs (see :mod:`lightning_cs336.sweep`).

Usage::

    cs336 sweep --config configs/debug.yaml --space configs/sweeps/debug_space.yaml --trials 20
    cs336 sweep --config base.yaml --space space.yaml --trials 50 --sampler tpe --pruner median:n_startup_trials=3
    cs336 sweep --config base.yaml --space space.yaml --trials 50 --study lr --storage journal:///shared/lr.log
    cs336 sweep --config base.yaml --space space.yaml --trials 8 -- --trainer.devices=2 --trainer.strategy=ddp
    cs336 sweep --config base.yaml --space space.yaml --wandb --out sweep.yaml   # a W&B sweep config instead

Arguments after ``--`` go to every trial's ``cs336 fit``. Re-running the same command continues the study; running it
on several machines against one ``--storage`` shares the study. ``--trials`` is the study's total.
Exit status: 0 when every trial this worker ran completed or was pruned, 1 when some failed (or none completed),
2 for bad input, 130/143 when interrupted (the interrupted trials are retried by the next run).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_cs336.cli.ablate import RaisingParser


def _parser() -> argparse.ArgumentParser:
    parser = RaisingParser(
        prog="cs336 sweep",
        usage="cs336 sweep --config BASE --space SPACE.yaml [--trials N] [options] [-- cs336 fit args ...]",
        description="Search hyperparameters with Optuna: each trial a `cs336 fit` run of BASE with values sampled "
        "from SPACE (dotted keys: `model.max_lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}`, ints, "
        "categoricals), pruned at any validation by the pruner. The study is kept in "
        "<root>/<project>/sweeps/<study>.db unless --storage says otherwise; results in "
        "<root>/<project>/sweeps/<study>.{json,md,html} and the best config in <study>.best.yaml.",
        epilog="samplers: tpe (default), random, grid; pruners: median (default), successive-halving, hyperband, "
        "threshold, none; options after a colon: --pruner successive-halving:min_resource=100,reduction_factor=3 "
        "(steps are optimizer steps).\n\nexamples:"
        + (__doc__ or "").split("Usage::", 1)[1].split("Arguments after", 1)[0].rstrip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, metavar="BASE", help="the base cs336 fit config")
    parser.add_argument("--space", required=True, metavar="SPACE", help="the search space (YAML, dotted keys)")
    parser.add_argument("--trials", type=int, default=20, metavar="N", help="the study's total trials (default 20)")
    parser.add_argument("--study", metavar="NAME", help="study name: W&B group, run prefix (default config-space)")
    parser.add_argument("--storage", metavar="URL", help="Optuna storage: sqlite:///f.db, journal:///f.log, "
                        "postgresql://... (default: sqlite next to the runs)")  # fmt: skip
    parser.add_argument("--sampler", default="tpe", metavar="NAME", help="tpe (default), random, grid")
    parser.add_argument("--pruner", default="median", metavar="NAME", help="median (default), successive-halving, "
                        "hyperband, threshold, none")  # fmt: skip
    parser.add_argument("--metric", default="val/loss", help="the metric to optimize (default val/loss)")
    parser.add_argument("--mode", choices=("min", "max"), default="min", help="minimize or maximize (default min)")
    parser.add_argument("--seed", type=int, metavar="S", help="sampler seed (trial k samples with S+k)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help="trials at once in this worker (default 1)")
    parser.add_argument("--wandb", action="store_true", help="write a W&B sweep config (to --out) and run nothing")
    parser.add_argument("--out", metavar="FILE", help="with --wandb: where the sweep config goes (default stdout)")
    return parser


def sweep_main(argv: Sequence[str]) -> int:
    """``cs336 sweep ...``; returns the exit status."""
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    args = _parser().parse_args(argv)
    if args.out and not args.wandb:
        raise ValueError("sweep: --out goes with --wandb (the W&B sweep config's file)")
    from lightning_cs336 import sweep as lib

    if args.wandb:
        import yaml

        if not Path(args.config).is_file():
            raise FileNotFoundError(f"config {args.config} does not exist: pass --config PATH to a cs336 fit config")
        space = lib.load_space(args.space)
        lib.make_sampler(args.sampler, space, args.seed)
        lib.make_pruner(args.pruner)
        config = lib.wandb_sweep_config(
            args.config, space, args.metric, args.mode, args.sampler, args.pruner, extra, name=args.study
        )
        text = yaml.safe_dump(config, sort_keys=False)
        if args.out:
            Path(args.out).write_text(text, encoding="utf-8")
            print(f"cs336: W&B sweep config written to {args.out}: `wandb sweep {args.out}`, then `wandb agent "
                  "<sweep id>` on each machine", file=sys.stderr)  # fmt: skip
        else:
            print(text, end="")
        return 0
    result = lib.run_sweep(
        args.config,
        args.space,
        trials=args.trials,
        study=args.study,
        storage=args.storage,
        sampler=args.sampler,
        pruner=args.pruner,
        metric=args.metric,
        mode=args.mode,
        seed=args.seed,
        jobs=args.jobs,
        extra_args=extra,
    )
    print(result.text)
    for kind, path in result.files.items():
        print(f"  {kind + ':':12}{path}")
    sys.stdout.flush()
    return result.exit_code

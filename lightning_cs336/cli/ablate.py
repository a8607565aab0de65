"""``cs336 ablate``: a hyperparameter ablation, the baseline and each variant times each seed, each run its own
``cs336 fit`` process, then the table (see :mod:`lightning_cs336.ablate`).

Usage::

    cs336 ablate --config configs/quickstart.yaml --vary model.num_heads=2,8
    cs336 ablate --config base.yaml --vary model.num_heads=4,8,16 --vary model.max_lr=1e-3,3e-3 --seeds 0,1,2 --jobs 2
    cs336 ablate --config base.yaml --vary model.max_lr=1e-3,3e-3 --metric val/loss --mode min --name lr -- --no-wandb
    cs336 ablate --config base.yaml --vary model.max_lr=1e-3,3e-3 --dry-run   # validate and show the plan only

Arguments after ``--`` go to every run's ``cs336 fit``. Re-running the same command skips the runs that finished.
Exit status: 0 when every run finished, 1 when some did not (the table is printed all the same), 2 for bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from lightning_cs336 import ablate as lib


class RaisingParser(argparse.ArgumentParser):
    """Bad arguments raise ValueError, which ``cs336``'s main prints as one ``cs336: error: ...`` line (exit 2).

    (``cli.prepare.OneLineParser`` prints and exits itself; these commands' errors go through ``main``'s handler,
    which also releases claimed run directories.)"""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("cs336 ")
        raise ValueError(f"{command}: {message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    parser = RaisingParser(
        prog="cs336 ablate",
        usage="cs336 ablate --config BASE --vary KEY=V1,V2,... [--vary ...] [options] [-- cs336 fit args ...]",
        description="Run the baseline config and each variant (a grid over the --vary keys) for each seed, each as "
        "its own `cs336 fit` process, and tabulate the metric: final and best mean, std and n over seeds, delta vs "
        "the baseline. Results: <root>/<project>/ablations/<name>.{json,md,html}, a summary run record and W&B run.",
        epilog="examples:" + (__doc__ or "").split("Usage::", 1)[1].rstrip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, metavar="BASE", help="the base cs336 fit config (the baseline)")
    parser.add_argument(
        "--vary",
        action="append",
        required=True,
        metavar="KEY=V1,V2",
        help="a config key and its values (YAML scalars: 1e-3 is a float, true a bool; [a,b] a list); repeat for a "
        "grid",
    )
    parser.add_argument("--seeds", metavar="S1,S2", help="seeds, e.g. 0,1,2 (default: the config's own seed)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help="runs at once (default 1)")
    parser.add_argument("--metric", default="val/loss", help="the metric to tabulate (default val/loss)")
    parser.add_argument("--mode", choices=("min", "max"), default="min", help="which value is best (default min)")
    parser.add_argument("--name", help="the ablation's name: W&B group, run-name prefix (default: config stem+keys)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; launch nothing")
    return parser


def ablate_main(argv: Sequence[str]) -> int:
    """``cs336 ablate ...``; returns the exit status (0: every run finished, 1: some did not)."""
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    args = _parser().parse_args(argv)
    result = lib.run_ablation(
        args.config,
        args.vary,
        seeds=lib.parse_seeds(args.seeds) if args.seeds is not None else None,
        jobs=args.jobs,
        metric=args.metric,
        mode=args.mode,
        name=args.name,
        extra_args=extra,
        dry_run=args.dry_run,
    )
    print(result.text)
    for kind, path in result.files.items():
        print(f"  {kind + ':':8}{path}")
    sys.stdout.flush()
    return result.exit_code

"""``cs336 generate``: sample text from a trained checkpoint."""

from __future__ import annotations

from pathlib import Path

from lightning_cs336.cli.prepare import OneLineParser


def generate_main(argv: list[str]) -> int:
    """``cs336 generate``: sample text from a checkpoint written by ``cs336 fit`` or ``cs336 import-cs336``."""
    parser = OneLineParser(prog="cs336 generate", description="Sample text from a trained checkpoint.")
    parser.add_argument(
        "--ckpt",
        required=True,
        help="a .ckpt written by `cs336 fit` or `cs336 import-cs336`, or a W&B artifact such as ENTITY/PROJECT/"
        "model-RUN:best",
    )
    parser.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="at least 1 (default: 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help=">= 0; 0 for greedy decoding (default: 0.8)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass, in (0, 1] (default: 0.95)")
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps... (default: cpu)")
    parser.add_argument(
        "--tokenizer",
        metavar="PATH",
        default=None,
        help="a data directory written by `cs336 prepare`, or its tokenizer.json: for a checkpoint that holds no "
        "tokenizer (one imported without --tokenizer); otherwise the checkpoint's own is used",
    )
    args = parser.parse_args(argv)
    for name, ok, rule in (
        ("--max-new-tokens", args.max_new_tokens >= 1, "at least 1"),
        ("--temperature", args.temperature >= 0, ">= 0 (0 is greedy)"),
        ("--top-p", 0 < args.top_p <= 1, "in (0, 1]"),
        ("--num-samples", args.num_samples >= 1, "at least 1"),
    ):
        if not ok:
            value = getattr(args, name[2:].replace("-", "_"))
            raise ValueError(f"{name} {value:g} is out of range: it must be {rule}")

    import torch

    from lightning_cs336.callbacks.wandb_access import resolve_checkpoint
    from lightning_cs336.cs336_format import checkpoint_problem
    from lightning_cs336.module import LanguageModel

    device = _device(args.device)
    tokenizer = None
    if args.tokenizer is not None:
        from lightning_cs336.data import Tokenizer

        tokenizer = Tokenizer.from_path(args.tokenizer)
    # A local path, or a W&B artifact reference such as `entity/project/model-<run>:best` (needs network and a key).
    path = Path(resolve_checkpoint(args.ckpt))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: pass a .ckpt written by `cs336 fit`")
    try:
        module = LanguageModel.load_from_checkpoint(path, map_location=device)
    except ValueError:
        raise  # already one line with the fix (e.g. another architecture)
    except Exception as e:  # damaged file, a CS336-format file, a foreign checkpoint: say which, with the fix
        raise ValueError(checkpoint_problem(path, e)) from e
    if tokenizer is not None:
        if tokenizer.vocab_size > module.config.vocab_size:
            raise ValueError(
                f"--tokenizer {args.tokenizer} has {tokenizer.vocab_size} ids but the model's vocab_size is "
                f"{module.config.vocab_size}: pass the tokenizer of the data the model was trained on"
            )
        module.tokenizer = tokenizer
    if module.tokenizer is None:
        raise ValueError(
            f"checkpoint {path} holds no tokenizer (imported by `cs336 import-cs336` without --tokenizer): pass "
            "--tokenizer DATA_DIR (the `cs336 prepare` directory it was trained on, or its tokenizer.json)"
        )
    generator = torch.Generator(device=device).manual_seed(args.seed)
    # An empty prompt starts a new document: the end-of-text token is what precedes every document in training.
    prompt_ids = module.encode(args.prompt) if args.prompt else [module.tokenizer.eot_id]
    for i in range(args.num_samples):
        new_ids = module.generate(
            [prompt_ids], args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, generator=generator
        )[0]
        text = module.decode(new_ids)
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(args.prompt + text)
    return 0


def _device(name: str) -> str:
    """``name`` if torch can use it here, else a one-line error (not a traceback from deep inside torch.load)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device name ({e}); use cpu, cuda, cuda:N or mps") from e
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }.get(device.type, True)
    if not available:
        raise ValueError(f"--device {name}: this machine has no {device.type} device; use --device cpu")
    return name

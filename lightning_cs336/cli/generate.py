"""``cs336 generate``: sample text from a trained checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path


def generate_main(argv: list[str]) -> int:
    """``cs336 generate``: sample text from a checkpoint written by ``cs336 fit``."""
    parser = argparse.ArgumentParser(prog="cs336 generate", description="Sample text from a trained checkpoint.")
    parser.add_argument(
        "--ckpt",
        required=True,
        help="a .ckpt written by `cs336 fit` (or `cs336 import-cs336`), or a W&B artifact such as ENTITY/PROJECT/"
        "model-RUN:best",
    )
    parser.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for name, ok, rule in (
        ("--max-new-tokens", args.max_new_tokens >= 1, "at least 1"),
        ("--temperature", args.temperature >= 0, ">= 0 (0 is greedy)"),
        ("--top-p", 0 < args.top_p <= 1, "in (0, 1]"),
        ("--num-samples", args.num_samples >= 1, "at least 1"),
    ):
        if not ok:
            raise ValueError(f"{name} {getattr(args, name[2:].replace('-', '_'))} is out of range: it must be {rule}")

    import torch

    from lightning_cs336.callbacks.wandb_access import resolve_checkpoint
    from lightning_cs336.module import LanguageModel

    # A local path, or a W&B artifact reference such as `entity/project/model-<run>:best` (needs network and a key).
    path = Path(resolve_checkpoint(args.ckpt))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: pass a .ckpt written by `cs336 fit`")
    module = LanguageModel.load_from_checkpoint(path, map_location=args.device)
    if module.tokenizer is None:
        raise ValueError(f"checkpoint {path} holds no tokenizer: it was not written by `cs336 fit`")
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
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

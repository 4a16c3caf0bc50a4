"""`dsfast` command line: each subcommand lives in its own module and is imported only when used."""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "train": ("dsfast.train.cli", "Train a run from a YAML config (DomainStudio, DreamBooth, finetune)."),
    "dreambooth": ("dsfast.train.dreambooth_cli", "Train with the flags of diffusers' train_dreambooth.py."),
    "sample": ("dsfast.train.sample", "Generate images from a run's weights."),
    "eval": ("dsfast.eval.cli", "Intra-LPIPS / FID style metrics of a folder of samples."),
    "pretrain": ("dsfast.pretrain", "Train the demo's small source model from scratch."),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        lines = [f"  {name:<9} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
        print("usage: dsfast <command> [options]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())

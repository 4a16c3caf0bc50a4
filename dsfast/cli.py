"""`dsfast` command line: each subcommand lives in its own module and is imported only when used.

Nothing heavy is imported here (no torch), so ``dsfast --help`` and a mistyped command answer at once.
"""
from __future__ import annotations

import difflib
import importlib
import sys

SUBCOMMANDS = {
    "train": ("dsfast.train.cli", "Train a run from a YAML config (DomainStudio, DreamBooth, finetune)."),
    "dreambooth": ("dsfast.train.dreambooth_cli", "Train with the flags of diffusers' train_dreambooth.py."),
    "sample": ("dsfast.train.sample", "Generate images from a run's weights."),
    "eval": ("dsfast.eval.cli", "Intra-LPIPS / FID style metrics of a folder of samples."),
    "plan": ("dsfast.plan", "Predict peak GPU memory of a run per memory option; the largest batch x resolution that fits."),
    "pretrain": ("dsfast.pretrain", "Train the demo's small source model from scratch."),
}


def usage() -> str:
    lines = [f"  {name:<9} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return ("usage: dsfast <command> [options]\n\ncommands:\n" + "\n".join(lines)
            + "\n\n'dsfast <command> --help' describes a command's options.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command = argv[0]
    if command not in SUBCOMMANDS:
        close = difflib.get_close_matches(command, SUBCOMMANDS, n=1)
        hint = f", did you mean '{close[0]}'?" if close else f" (commands: {', '.join(SUBCOMMANDS)})"
        print(f"dsfast: unknown command '{command}'{hint}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[command][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())

"""``dsfast train --config run.yaml [key=value ...] [--resume latest]``."""
from __future__ import annotations

import argparse
import sys

from .engine import train
from .errors import USER_ERRORS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="dsfast train",
        description="Train DomainStudio / DreamBooth / finetune from a YAML config. "
                    "Extra key=value arguments override config keys (dotted, e.g. train.lr=1e-5).")
    ap.add_argument("--config", required=True, help="YAML run config")
    ap.add_argument("--resume", default=None,
                    help="'latest' (error if none), 'auto' (default: latest if present), 'none', or a checkpoint dir")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run = train(args.config, args.overrides, resume=args.resume)
    except USER_ERRORS as exc:
        print(f"dsfast train: error: {exc}", file=sys.stderr)
        return 1
    print(f"dsfast train: done, run folder {run}")
    return 0

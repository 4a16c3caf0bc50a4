"""``dsfast train --config run.yaml [key=value ...] [--resume latest]``."""
from __future__ import annotations

import argparse
import sys

from pydantic import BaseModel

from dsfast.argtypes import ArgumentParser

from . import methods
from .config import RunConfig
from .engine import train
from .errors import USER_ERRORS


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.default
    return "(method / model default)" if value is None else repr(value) if isinstance(value, str) else str(value)


def _line(key: str, field, note: str = "") -> str:
    return f"  {key:<30} {_default(field):<24} {field.description or ''}{note}".rstrip()


def _loss_lines() -> list[str]:
    """The ``loss`` keys of every method's section, each once, naming the methods that have it when not all do."""
    keys: dict[str, tuple] = {}
    for method, section in methods.LOSS_CONFIGS.items():
        for key, field in section.model_fields.items():
            keys.setdefault(key, (field, []))[1].append(method)
    return [_line(f"loss.{key}", field, "" if len(owners) == len(methods.LOSS_CONFIGS) else f" [{' / '.join(owners)}]")
            for key, (field, owners) in keys.items()]


def config_keys_help(cls: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """One line per config key of the schema: dotted key, default, its description (sections in schema order; the
    ``loss`` section per method)."""
    lines = []
    for name, field in cls.model_fields.items():
        ann = field.annotation
        if cls is RunConfig and name == "loss":
            lines += _loss_lines()
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            lines += config_keys_help(ann, f"{prefix}{name}.")
        else:
            lines.append(_line(prefix + name, field))
    return lines


def main(argv=None) -> int:
    ap = ArgumentParser(
        prog="dsfast train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train DomainStudio / DreamBooth / finetune from a YAML config. "
                    "Extra key=value arguments override config keys (dotted, e.g. train.lr=1e-5).",
        epilog="config keys (key, default, meaning):\n" + "\n".join(config_keys_help()))
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

"""``dsfast train --config run.yaml [key=value ...] [--resume latest]``."""
from __future__ import annotations

import argparse
import sys

import yaml
from pydantic import BaseModel

from dsfast.argtypes import ArgumentParser

from . import methods
from .config import RunConfig
from .engine import train
from .errors import USER_ERRORS


def _required(field) -> bool:
    """``model.pretrained`` and ``data.instance_dir`` default to "" and ``RunConfig`` refuses that: required."""
    return field.is_required() or field.default == ""


def _default(field) -> str:
    if _required(field):
        return "required"
    value = field.default
    return "(method / model default)" if value is None else repr(value) if isinstance(value, str) else str(value)


def _line(key: str, field, note: str = "") -> str:
    return f"  {key:<30} {_default(field):<24} {field.description or ''}{note}".rstrip()


def config_keys(cls: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, object, list[str]]]:
    """Every config key of the schema as (dotted key, pydantic field, the methods that have it): sections in schema
    order; the ``loss`` section is each method's own, so its keys are listed once each with their methods."""
    keys = []
    for name, field in cls.model_fields.items():
        ann = field.annotation
        if cls is RunConfig and name == "loss":
            keys += [(f"loss.{key}", loss_field, owners) for key, (loss_field, owners) in methods.LOSS_KEYS.items()]
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += config_keys(ann, f"{prefix}{name}.")
        else:
            keys.append((prefix + name, field, list(methods.LOSS_CONFIGS)))
    return keys


def _owners_note(owners: list[str]) -> str:
    """`` [domainstudio]`` for a key only some methods have, else nothing."""
    return "" if len(owners) == len(methods.LOSS_CONFIGS) else f" [{' / '.join(owners)}]"


def config_keys_help() -> list[str]:
    """One line per config key: dotted key, default, its description (``dsfast train --help``)."""
    return [_line(key, field, _owners_note(owners)) for key, field, owners in config_keys()]


def _method_defaults(key: str) -> str:
    """The values the methods fill an unset ``loss.*`` / ``train.*`` key with, per method and model kind
    (``Method.defaults``), e.g. ``domainstudio: 4.0 (unconditional), 100.0 (text2image)``; empty for other keys."""
    section, name = key.split(".")[0], key.split(".")[-1]
    if section not in ("loss", "train"):
        return ""
    per_method = []
    for method in methods.METHODS:
        values = [f"{d[name]} ({kind})" for kind, d in method.defaults.items() if name in d]
        if method.mode == "dsfast" and values:
            per_method.append(f"{method.name}: {', '.join(values)}")
    return "; ".join(per_method)


def _cell(text: str) -> str:
    """Text for a Markdown table cell: ``|`` escaped, ``<`` and ``>`` as entities (``<image stem>`` is no tag)."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def config_keys_markdown() -> str:
    """The Markdown table of every config key (key, default, meaning) that docs/config.md holds between its
    markers (``python -m dsfast.train.config_doc`` writes it there). An unset key's default is what the methods
    fill in, per method and model kind, or else ``unset``, and its description says what unset means."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, field, owners in config_keys():
        if _required(field):
            default = "required"
        elif field.default is None:
            default = _method_defaults(key) or "unset"
        else:
            default = f"`{yaml.safe_dump(field.default, default_style=None).splitlines()[0]}`"  # as YAML writes it
        rows.append(f"| `{key}` | {_cell(default)} | {_cell((field.description or '') + _owners_note(owners))} |")
    return "\n".join(rows) + "\n"


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

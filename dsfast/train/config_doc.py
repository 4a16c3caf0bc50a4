"""``python -m dsfast.train.config_doc [--check] [docs/config.md]`` (``make docs``): writes the table of every config
key, generated from the schema (:func:`dsfast.train.cli.config_keys_markdown`), between the marker comments of
docs/config.md; ``--check`` changes nothing and exits 1 when the file's table differs from the generated one."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import config_keys_markdown

START, END = "<!-- dsfast-config-keys:start -->", "<!-- dsfast-config-keys:end -->"
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def with_table(text: str) -> str:
    """``text`` with the generated table between its markers (each must occur exactly once, START first)."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"the file must hold {START} and then {END}, once each")
    head, rest = text.split(START)
    return f"{head}{START}\n{config_keys_markdown()}{END}{rest.split(END)[1]}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsfast.train.config_doc", description=__doc__.split("\n\n")[0])
    ap.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH, help="the Markdown file (default: docs/config.md)")
    ap.add_argument("--check", action="store_true", help="exit 1 if the table is not the generated one; write nothing")
    args = ap.parse_args(argv)
    try:
        text = args.path.read_text()
        new = with_table(text)
    except (OSError, ValueError) as exc:
        print(f"config_doc: error: {args.path}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"{args.path}: the config key table is out of date; run `make docs`", file=sys.stderr)
            return 1
        return 0
    args.path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The documentation: every relative link of README.md, CHANGELOG.md and docs/*.md reaches an existing file and,
with an anchor, a heading of it; docs/config.md's table of config keys is the one the schema generates."""
import re
import unicodedata
from pathlib import Path

import pytest

from dsfast.train import config_doc

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, characters other than letters, marks, digits,
    ``_``, ``-`` and spaces dropped, spaces as ``-``, a repeated anchor numbered ``-1``, ``-2``, ..."""
    seen: dict[str, int] = {}
    out = set()
    for line in re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = "".join(c for c in m.group(1).lower()
                       if c in " -_" or unicodedata.category(c)[0] in "LMN").replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def links(path: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(path.read_text())) if not re.match(r"[a-z]+:", t)]


def test_the_docs_link_somewhere():
    assert len(DOCS) > 5 and sum(len(links(p)) for p in DOCS) > 30  # the check below is not vacuous


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(doc):
    bad = []
    for target in links(doc):
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            bad.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            bad.append(f"{target}: no heading with anchor #{anchor}")
    assert not bad, f"{doc.relative_to(ROOT)}: " + "; ".join(bad)


def test_anchors_follow_github():
    path = ROOT / "docs" / "training.md"
    assert {"model-families-sd-12-sdxl-sd3-flux1", "the-trainers-code",
            "from-diffusers-train_dreamboothpy-dsfast-dreambooth"} <= anchors(path)


def test_config_key_table_is_the_generated_one():
    text = (ROOT / "docs" / "config.md").read_text()
    assert config_doc.with_table(text) == text, "docs/config.md's config key table is out of date: run `make docs`"
    for key in ("train.lr", "loss.image", "deepspeed.zero_stage", "sample_every"):
        assert f"| `{key}` |" in text


def test_config_doc_needs_its_markers_once():
    with pytest.raises(ValueError, match="dsfast-config-keys:start"):
        config_doc.with_table("# no markers\n")
    with pytest.raises(ValueError, match="once each"):
        config_doc.with_table(f"{config_doc.START}\n{config_doc.END}\n{config_doc.END}\n")


# ----------------------------------------------------------------------------------------- recipes
def _recipe_blocks():
    """docs/recipes.md's (bash, yaml) code blocks, in order: one pair per recipe."""
    text = (ROOT / "docs" / "recipes.md").read_text()
    return re.findall(r"^```bash\n(.*?)^```\n\n```yaml\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.quant  # resolve checks that the recipe's packages are installed
@pytest.mark.parametrize("family, down_factor", [("flux", 16), ("sdxl", 8)])
def test_recipe_flags_and_yaml_are_one_valid_config(family, down_factor, monkeypatch):
    """Each recipe's YAML loads and resolves for its family (as on a GPU: nf4 needs one), and its `dsfast
    dreambooth` flags map to that config."""
    import shlex

    import torch
    import yaml

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    from dsfast.train import dreambooth_cli
    from dsfast.train.config import load_config, resolve

    blocks = dict(zip(("flux", "sdxl"), _recipe_blocks()))
    assert len(_recipe_blocks()) == 2
    flags, text = blocks[family]
    cfg = load_config(yaml.safe_load(text))
    r = resolve(cfg, family, down_factor=down_factor)
    assert (r.model.quantize, r.train.optimizer, r.model.drop_text_encoders, r.loss.source) == \
        ("nf4", "adamw8bit", True, "lora_off")
    argv = shlex.split(flags.replace("\\\n", " "))
    assert argv[:2] == ["dsfast", "dreambooth"]
    args, extra = dreambooth_cli.parser().parse_known_args(argv[2:])
    assert not extra
    from_flags = load_config(dreambooth_cli.flags_to_config(args), args.overrides)
    assert from_flags.model_dump() == cfg.model_dump()

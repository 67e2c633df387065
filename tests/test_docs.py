"""The docs against the code: docs/config.md documents exactly the config's keys, docs/datasets.md
every dataset kind, every config file the docs name exists, and every documented command parses."""
from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig

from sceneparse.engine.config import default_config

CONFIG_DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def leaf_keys(node: DictConfig, prefix: str = "") -> set[str]:
    keys = set()
    for key in node.keys():
        value = node._get_node(key)
        # Section dataclasses recurse; free-form mappings (encoder_options, synthetic) are leaves.
        if isinstance(value, DictConfig) and value._metadata.object_type not in (None, dict):
            keys |= leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def test_config_doc_lists_every_key_and_no_other():
    documented = set(re.findall(r"^\| `([a-z_.]+)` \|", CONFIG_DOC.read_text(), flags=re.MULTILINE))
    actual = leaf_keys(default_config())
    assert {"train.iterations", "data.synthetic", "model.encoder_options", "output_dir"} <= actual
    assert sorted(actual - documented) == [], "keys missing from docs/config.md"
    assert sorted(documented - actual) == [], "docs/config.md documents keys that do not exist"


def test_config_doc_defaults_match_the_code():
    import yaml
    from omegaconf import OmegaConf

    cfg = default_config()
    checked = 0
    for key, default in re.findall(r"^\| `([a-z_.]+)` \| [^|]+ \| `([^`|]+)` \|", CONFIG_DOC.read_text(), re.MULTILINE):
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        assert yaml.safe_load(default) == value, key
        checked += 1
    assert checked >= 40


DOCS = Path(__file__).resolve().parents[1] / "docs"
ROOT = DOCS.parent


def test_datasets_doc_covers_every_dataset_kind():
    from sceneparse.data import DATASETS

    table = re.findall(r"^\| `([a-z0-9_]+)` \|", (DOCS / "datasets.md").read_text(), flags=re.MULTILINE)
    assert table == list(DATASETS)


def test_configs_named_in_the_docs_exist():
    texts = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    named = {m for path in texts for m in re.findall(r"\bconfigs/[\w./-]+\.yaml\b", path.read_text())}
    assert len(named) >= 8
    assert sorted(p for p in named if not (ROOT / p).is_file()) == []


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every `sceneparse ...` command in a fenced code block of the README and docs/*.md (also
    under `time` or `torchrun ... -m`), as (where, argv after "sceneparse"); continuation lines
    joined, comments dropped."""
    import shlex

    commands = []
    for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        in_block, lines = False, []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_block = not in_block
                continue
            if in_block:
                lines.append((number, line))
        joined: list[tuple[int, str]] = []
        for number, line in lines:
            if joined and joined[-1][1].endswith("\\"):
                joined[-1] = (joined[-1][0], joined[-1][1][:-1] + " " + line.strip())
            else:
                joined.append((number, line.strip()))
        for number, line in joined:
            starts_a_command = line.startswith(("sceneparse ", "time sceneparse ", "torchrun "))
            words = shlex.split(line, comments=True) if starts_a_command else []
            if words[:1] == ["time"]:
                words = words[1:]
            if words[:1] == ["torchrun"] and "-m" in words:
                words = words[words.index("-m") + 1 :]
            if words[:1] == ["sceneparse"] and len(words) > 1:
                commands.append((f"{path.name}:{number}", words[1:]))
    return commands


def test_documented_commands_use_real_commands_options_and_settings(monkeypatch):
    """A renamed option or setting breaks its docs here, not in a user's shell: each documented
    command parses with the CLI's own parser, and each train command's config and overrides load
    (with the repository's config files; a run's own config.yaml is left out)."""
    from sceneparse.cli.main import build_parser
    from sceneparse.engine.config import load_config

    monkeypatch.chdir(ROOT)
    commands = documented_commands()
    assert len(commands) >= 30 and {argv[0] for _, argv in commands} >= {
        "train", "eval", "predict", "export", "serve", "zoo", "convert", "data"}
    failures, loaded = [], 0
    for where, argv in commands:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            failures.append(f"{where}: sceneparse {' '.join(argv)}: not a valid command line")
            continue
        if argv[0] == "train" and (ROOT / args.config).is_file():
            try:
                load_config(args.config, args.overrides)
                loaded += 1
            except Exception as err:  # noqa: BLE001 - reported with its place in the docs
                failures.append(f"{where}: {err}")
    assert failures == []
    assert loaded >= 8

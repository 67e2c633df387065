"""The docs against the code: docs/config.md documents exactly the config's keys, docs/datasets.md
every dataset kind, and every config file the docs name exists."""
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

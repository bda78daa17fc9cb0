"""Each recipe key is documented once, on its dataclass field: README's recipe reference is generated from the
fields and must be current, every field has help text, and the CLI's shorthand flags show the same text."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spa_lite import config
from spa_lite.cli import app
from spa_lite.errors import SpaError

README = Path(__file__).resolve().parent.parent / "README.md"


def _all_fields():
    yield from (("", f) for f in dataclasses.fields(config.Recipe))
    for section in config.SECTIONS:
        cls = type(getattr(config.Recipe(), section))
        yield from ((section, f) for f in dataclasses.fields(cls))


def test_readme_reference_is_current():
    text = README.read_text(encoding="utf-8")
    start = text.index(config.REFERENCE_BEGIN) + len(config.REFERENCE_BEGIN) + 1
    section = text[start:text.index(config.REFERENCE_END)]
    assert section == config.recipe_reference(), (
        "README.md's recipe reference is stale: run `python -m spa_lite.config --write README.md`")


def test_every_field_has_help_and_a_row():
    ref = config.recipe_reference()
    missing = [f"{s}.{f.name}" if s else f.name for s, f in _all_fields() if not f.metadata.get("help")]
    assert missing == []
    for section, f in _all_fields():
        key = f"{section}.{f.name}" if section else f.name
        if section == "train" and f.name in {g.name for g in dataclasses.fields(config.SeedDPOConfig)} \
                and getattr(config.TrainConfig(), f.name) == getattr(config.SeedDPOConfig(), f.name):
            continue  # a seed_dpo key train keeps as is: the `train.*` row
        assert f"| `{key}` |" in ref or f"| **`{key}`** |" in ref, key
    assert "| `train.epochs` | `1.0` |" in ref and "| `seed_dpo.epochs` | `3.0` |" in ref
    assert "| `train.lr` |" not in ref and "| `train.*` | as `seed_dpo` |" in ref


def test_replace_reference_needs_markers_and_is_idempotent():
    with pytest.raises(SpaError, match="no recipe reference markers"):
        config.replace_reference("# a README without the markers\n")
    text = f"intro\n{config.REFERENCE_BEGIN}\nold table\n{config.REFERENCE_END}\noutro\n"
    once = config.replace_reference(text)
    assert once == config.replace_reference(once)
    assert once.startswith("intro\n") and once.endswith(f"{config.REFERENCE_END}\noutro\n") and "old table" not in once


def test_choices_come_from_the_fields():
    assert config._CHOICES[("train", "loss")] == config._CHOICES[("seed_dpo", "loss")] == {"dpo", "dro"}
    assert config._CHOICES[("expand", "judge_ref")] == {"init", "prev", "none"}
    with pytest.raises(SpaError, match="train.loss: 'ipo' is not one of dpo, dro"):
        config.load_recipe(None, {"train.loss": "ipo"})


@pytest.mark.parametrize("command,section,keys", [
    ("train", "train", ["refine", "dnd", "loss", "dro_xi_min"]),
    ("seed-dpo", "seed_dpo", ["loss", "dro_epsilon", "dro_pieces"]),
    ("expand", "expand", ["judge", "judge_ref", "length_penalty", "max_new_tokens"]),
])
def test_shorthand_flags_show_the_field_help(command, section, keys):
    res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.replace("│", " ").split())
    for key in keys:
        assert " ".join(config.field_help(section, key).split()) in flat, key

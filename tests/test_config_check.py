"""Every TOML value is checked against its field before training: file, section, key, value, expectation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from torchtitan.config import ConfigManager

from titan_hybrid.config.check import ConfigValueError, check_job_config
from titan_hybrid.flavors import table
from titan_hybrid.models.hybrid import train_spec

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "train_configs").glob("*.toml"))


def parse(config_file: Path, *overrides: str):
    train_spec.register()
    return ConfigManager().parse_args(["--job.config_file", str(config_file), *overrides])


def with_values(tmp_path: Path, replacements: dict[str, str]) -> Path:
    """debug_cpu.toml with some ``key = value`` lines replaced (each must exist) or appended."""
    text = (ROOT / "train_configs" / "debug_cpu.toml").read_text()
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new, 1)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("config_file", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_pass(config_file):
    check_job_config(parse(config_file))


def test_each_bad_value_is_named_with_its_file(tmp_path):
    path = with_values(tmp_path, {
        'pattern = "gggA"': 'pattern = "gggA"\ndim = "big"\ndocument_masking = "false"\nxsa = "yes"',
        "[hybrid_data]\n": '[resilience]\non_nonfinite_loss = "skpi"\n\n[hybrid_data]\n',
        "weight = 0.5": 'weight = "0.5"',
        "steps = 30": "steps = 1.5",
        'sources = ["web"]': 'sources = ["web", 1]',
        'flavor = "debug"': 'flavor = "huge"\nconverters = ["quantize.linear.float8", "float8"]',
    })  # fmt: skip

    with pytest.raises(ConfigValueError) as e:
        check_job_config(parse(path))

    assert str(e.value).splitlines() == [
        f'{path}: [training] steps = 1.5: expected an integer',
        f'{path}: [hybrid_model] dim = "big": expected an integer',
        f'{path}: [hybrid_model] xsa = "yes": expected true or false or a list of (an integer)',
        f'{path}: [hybrid_model] document_masking = "false": expected true or false',
        f'{path}: [hybrid_data.web] weight = "0.5": expected a number',
        f'{path}: [hybrid_validation] sources = ["web", 1]: expected a list of (a string)',
        f'{path}: [resilience] on_nonfinite_loss = "skpi": expected one of "stop", "skip"',
        f'{path}: [model] flavor = "huge": expected one of "debug", "308M", "gdn2_kla_1.3B", "gdn_attn_63M", '
        '"pgolf_gdn_attn" (python -m titan_hybrid.flavors lists them with their sizes)',
        f'{path}: [model] converters = ["quantize.linear.float8", "float8"]: "float8" unknown; expected names '
        'from "quantize.grouped_mm.float8", "quantize.grouped_mm.mx", "quantize.linear.float8", "quantize.linear.mx"',
    ]


def test_command_line_values_are_typed_and_pass(tmp_path):
    config = parse(ROOT / "train_configs" / "debug_cpu.toml", "--hybrid_model.dim", "64", "--optimizer.lr", "1")
    check_job_config(config)
    assert config.hybrid_model.dim == 64 and config.optimizer.lr == 1.0


def test_flavors_table_has_parameter_counts():
    rows = {line.split()[0]: line.split()[1] for line in table().splitlines()[1:]}
    assert rows["debug"] == "7,206,496" and rows["gdn2_kla_1.3B"] == "1,293,644,608"
    assert re.fullmatch(r"[\d,]+", rows["308M"]) and 300e6 < int(rows["308M"].replace(",", "")) < 320e6

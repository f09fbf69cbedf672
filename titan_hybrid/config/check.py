"""Type and value checks of a parsed JobConfig, before anything is built.

TorchTitan copies TOML values into its config dataclasses as they are (only command-line
values are parsed by type), so ``dim = "big"`` fails deep inside the model code,
``document_masking = "false"`` is a true string and a misspelt ``Literal`` choice runs as
whatever the code compares it with. ``check_job_config`` compares every value of every
section with its field's annotation and reports each mismatch on one line: file, section,
key, value and what is expected.
"""

from __future__ import annotations

import dataclasses
import json
import types
from typing import Any, Literal, Union, get_args, get_origin

from torchtitan.protocols import model_converter
from torchtitan.protocols.train_spec import get_train_spec


class ConfigValueError(ValueError):
    """A config value does not match its field; the message has one line per bad value."""


def _matches(value: Any, annotation: Any) -> bool:
    origin = get_origin(annotation)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_matches(value, arm) for arm in get_args(annotation))
    if origin is Literal:
        return any(value == choice and type(value) is type(choice) for choice in get_args(annotation))
    if origin is list:
        (item,) = get_args(annotation)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:  # TOML writes 1 for 1.0
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    raise TypeError(f"no check for config annotation {annotation!r}")


def expected(annotation: Any) -> str:
    """What a value of ``annotation`` looks like in TOML."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        arms = [a for a in get_args(annotation) if a is not type(None)]
        return " or ".join(expected(a) for a in arms)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(c) for c in get_args(annotation))
    if origin is list:
        return f"a list of ({expected(get_args(annotation)[0])})"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Any: "anything"}
    return names[annotation]


def _problems(config: Any, section: str) -> list[str]:
    found = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(f.type):
            found += _problems(value, f"{section}.{f.name}" if section else f.name)
        elif not _matches(value, f.type):
            found.append(f"[{section}] {f.name} = {json.dumps(value)}: expected {expected(f.type)}")
    return found


def check_job_config(config: Any) -> None:
    """Raise ``ConfigValueError`` naming every value that does not fit its field, and an unknown flavor."""
    source = config.job.config_file or "the command line"
    problems = _problems(config, "")
    flavors = get_train_spec(config.model.name).model_args
    if config.model.flavor not in flavors:
        problems.append(
            f"[model] flavor = {json.dumps(config.model.flavor)}: expected one of "
            + ", ".join(json.dumps(name) for name in flavors)
            + " (python -m titan_hybrid.flavors lists them with their sizes)"
        )
    # TorchTitan looks each name up in its converter registry only when it builds the model (a bare
    # KeyError then); the registry is filled when torchtitan.components.quantization is imported.
    converters = model_converter._registry_model_converter_cls
    unknown = [name for name in config.model.converters if name not in converters]
    if unknown:
        problems.append(
            f"[model] converters = {json.dumps(config.model.converters)}: "
            + ", ".join(json.dumps(name) for name in unknown)
            + " unknown; expected names from "
            + ", ".join(json.dumps(name) for name in sorted(converters))
        )
    if problems:
        raise ConfigValueError("\n".join(f"{source}: {p}" for p in problems))

"""Recipes and command lines into configs: YAML recipes (safe, with duplicate keys, alias bombs and bad
bytes refused naming file and line), `--key value` overrides, and the type checks of every value.

A recipe key is any field of the four configs in `config.py`; the shipped recipes live in
circuit_breakers/configs and the accelerate presets in circuit_breakers/accelerate_configs.
"""

from __future__ import annotations

import difflib
import math
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import fields
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers import HfArgumentParser

from .config import (
    ACCELERATE_CONFIGS_DIR,
    RECIPES_DIR,
    CircuitBreakerConfig,
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfig,
)
from .fileio import decode_utf8

CONFIG_CLASSES = (ModelConfig, DataConfig, CircuitBreakerConfig, RunConfig)


def _file_or_shipped(name: str, folder: Path, what: str) -> Path:
    """`name` as a path, else the YAML file of that name shipped in `folder`; a clear error otherwise."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = folder / (name if name.endswith(".yaml") else name + ".yaml")
    if shipped.is_file():
        return shipped
    available = sorted(p.stem for p in folder.glob("*.yaml"))
    raise ConfigError(f"{what} {name!r} not found (not a file, nor a shipped one: {', '.join(available)})")


def recipe_path(name: str) -> Path:
    """A recipe file: a path, or the name of one shipped in circuit_breakers/configs (e.g. `embedded`)."""
    return _file_or_shipped(name, RECIPES_DIR, "recipe")


def accelerate_config_path(name: str) -> Path:
    """An accelerate config: a path, or one shipped in circuit_breakers/accelerate_configs (ddp, fsdp2,
    deepspeed_zero2, deepspeed_zero3)."""
    return _file_or_shipped(name, ACCELERATE_CONFIGS_DIR, "accelerate config")


def valid_keys() -> list[str]:
    """Every key a recipe or the command line may set."""
    return sorted({f.name for cls in CONFIG_CLASSES for f in fields(cls) if f.init})


def unknown_key_error(keys: list[str], where: str) -> ConfigError:
    valid = valid_keys()
    hints = [
        f"{k} (did you mean {', '.join(m)}?)" if (m := difflib.get_close_matches(k, valid, n=2)) else k for k in keys
    ]
    return ConfigError(f"unknown {where} key(s): {'; '.join(hints)}. Valid keys: {', '.join(valid)}")


@cache
def _key_types() -> dict[str, Any]:
    return {k: v for cls in CONFIG_CLASSES for k, v in typing.get_type_hints(cls).items()}


def _as_number(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, kind) or (kind is float and isinstance(value, int)):
        return True
    if isinstance(value, str):  # YAML 1.1 reads `1e-3` as text; argparse converts it
        try:
            kind(value)
            return True
        except ValueError:
            return False
    return False


def _type_mismatch(value: Any, tp: Any) -> str | None:
    """What `value` should have been for a field of type `tp`, or None when it fits. Only the plain
    types of our own keys are checked; Trainer keys with richer types are left to transformers."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None and len(inner) < len(args):
            return None
        problems = [_type_mismatch(value, a) for a in inner]
        return None if any(p is None for p in problems) else " or ".join(p for p in problems if p)
    if origin is Literal:
        return None if value in args else f"one of {list(args)}"
    if tp is bool:
        return None if isinstance(value, bool) else "true or false"
    if tp in (int, float):
        if tp is float and _as_number(value, float) and not math.isfinite(float(value)):
            return "a finite number"  # .inf / .nan: training would write an adapter of NaNs
        return None if _as_number(value, tp) else ("an integer" if tp is int else "a number")
    if tp is str:
        return None if isinstance(value, str) else "text"
    if origin is list and args and args[0] in (int, float, str):
        if isinstance(value, list) and all(_type_mismatch(v, args[0]) is None for v in value):
            return None
        return f"a list of {'integers' if args[0] is int else 'numbers' if args[0] is float else 'text'}"
    return None


MAX_ECHO = 200
"""Longest value repr an error message echoes; longer ones are cut (a recipe value can be huge)."""

MAX_RECIPE_VALUES = 100_000
"""Most values a recipe may hold once its aliases are expanded (a YAML alias bomb is refused)."""


def short_repr(value: Any, limit: int = MAX_ECHO) -> str:
    """`repr(value)` cut to `limit` characters, without building the whole repr of a huge value."""
    if isinstance(value, (list, dict, tuple)) and expanded_size(value, limit) > limit:
        return f"<a {type(value).__name__} of more than {limit} values>"
    text = repr(value[: limit + 1] if isinstance(value, str) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def expanded_size(value: Any, limit: int) -> int:
    """How many values `value` holds counting every alias anew; stops counting past `limit`."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple)):
            stack += item
    return count


class _RecipeLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping, naming it and its line."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {short_repr(key)}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_checked_int(self, node: yaml.ScalarNode) -> int:
        """An integer, or an error at its line when it has more digits than Python converts."""
        try:
            return self.construct_yaml_int(node)
        except ValueError as err:
            raise yaml.constructor.ConstructorError(
                None, None, f"integer too long ({len(node.value)} characters)", node.start_mark
            ) from err


_RecipeLoader.add_constructor("tag:yaml.org,2002:int", _RecipeLoader.construct_checked_int)


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe's key/value pairs (plain YAML data, safe_load: recipes cannot execute code). A duplicate
    key, undecodable text, a value nested or aliased beyond reason are refused naming file and line."""
    path = recipe_path(str(path))
    text = decode_utf8(path.read_bytes(), path, ConfigError)
    loader = _RecipeLoader(text)
    try:
        data = loader.get_single_data() or {}
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {' '.join(str(err.problem or err).split())}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(err).split())}") from err
    except RecursionError as err:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from err
    except ValueError as err:
        raise ConfigError(f"{path}: invalid value ({short_repr(str(err))})") from err
    finally:
        loader.dispose()
    if expanded_size(data, MAX_RECIPE_VALUES) > MAX_RECIPE_VALUES:
        raise ConfigError(
            f"{path}: the recipe's aliases expand to more than {MAX_RECIPE_VALUES} values; write the values out"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of keys to values")
    return check_settings(data, f"recipe ({path})", str(path))


def check_settings(settings: Mapping[str, Any], where: str, prefix: str | None = None) -> dict[str, Any]:
    """`settings` (recipe key -> value) checked as a recipe is: unknown keys refused with the valid ones,
    values of the wrong type refused naming the key. Returns them as a dict."""
    unknown = [k for k in settings if k not in valid_keys()]
    if unknown:
        raise unknown_key_error(unknown, where)
    key_types = _key_types()
    for key, value in settings.items():
        expected = _type_mismatch(value, key_types[key])
        if expected:
            raise ConfigError(f"{prefix or where}: {key} must be {expected}, got {short_repr(value)}")
    return dict(settings)


def settings_from_args(args: Sequence[str]) -> dict[str, Any]:
    """`--key value` command-line arguments as recipe settings, so library code never sees argv: values
    read as YAML like a recipe's (several values make a list, a bare flag is true, the last of a repeated
    key wins), except that text stays text where the key takes text and one value becomes a list where the
    key takes a list."""
    settings: dict[str, Any] = {}
    key: str | None = None
    raw: dict[str, list[str]] = {}
    for arg in args:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            raw.pop(key, None)  # the last one wins, as on any command line
            raw[key] = [value] if eq else []
        elif key is None:
            raise ConfigError(f"unexpected argument {arg!r}: expected --key value")
        else:
            raw[key].append(arg)
    unknown = [k for k in raw if k not in valid_keys()]
    if unknown:
        raise unknown_key_error(unknown, "command-line")
    key_types = _key_types()
    for key, values in raw.items():
        try:
            read = [yaml.safe_load(v) for v in values]
        except (yaml.YAMLError, ValueError, RecursionError) as err:  # ValueError: an integer too long
            raise ConfigError(f"--{key}: not a valid value: {short_repr(' '.join(str(err).split()))}") from err
        value: Any = True if not values else read[0] if len(read) == 1 else read
        for candidate in [value] if isinstance(value, list) else [value, [value]]:
            if _type_mismatch(candidate, key_types[key]) is None:
                value = candidate
                break
        else:
            text = values[0] if len(values) == 1 else list(values)
            if values and _type_mismatch(text, key_types[key]) is None:
                value = text
        settings[key] = value
    return settings


def parse_settings(
    settings: Mapping[str, Any], recipe: str | Path | None = None
) -> tuple[ModelConfig, DataConfig, CircuitBreakerConfig, RunConfig]:
    """Configs from a recipe with `settings` (recipe key -> value, checked as a recipe's) on top."""
    values = {**(load_recipe(recipe) if recipe is not None else {}), **check_settings(settings, "settings")}
    parser = HfArgumentParser(CONFIG_CLASSES)
    parser.set_defaults(**values)
    model_cfg, data_cfg, cb_cfg, run_cfg = parser.parse_args_into_dataclasses(args=[])
    return model_cfg, data_cfg, cb_cfg, run_cfg


def parse_config(
    args: list[str] | None = None, recipe: str | Path | None = None
) -> tuple[ModelConfig, DataConfig, CircuitBreakerConfig]:
    """Training configs from a recipe and overrides (run keys are accepted and ignored)."""
    return parse_run_config(args, recipe)[:3]  # type: ignore[return-value]


def parse_run_config(
    args: list[str] | None = None, recipe: str | Path | None = None
) -> tuple[ModelConfig, DataConfig, CircuitBreakerConfig, RunConfig]:
    """Recipe values, then `--key value` overrides, parsed by transformers' HfArgumentParser.

    `--config FILE` in `args` names the recipe; unknown keys in either place are rejected with the list
    of valid ones.
    """
    args = list(sys.argv[1:] if args is None else args)
    if "--config" in args:
        i = args.index("--config")
        if i + 1 >= len(args):
            raise ConfigError("--config needs a recipe path")
        recipe = args[i + 1]
        del args[i : i + 2]
    parser = HfArgumentParser(CONFIG_CLASSES)
    if recipe is not None:
        parser.set_defaults(**load_recipe(recipe))
    flags = [a.split("=", 1)[0][2:] for a in args if a.startswith("--")]
    unknown = [k for k in flags if k not in valid_keys()]
    if unknown:
        raise unknown_key_error(unknown, "command-line")
    try:
        model_cfg, data_cfg, cb_cfg, run_cfg = parser.parse_args_into_dataclasses(args=args)
    except SystemExit as err:  # argparse prints its own message first
        text = " ".join(args)
        text = text if len(text) <= MAX_ECHO else text[: MAX_ECHO - 3] + "..."
        raise ConfigError(f"invalid command line: {text}") from err
    _refuse_non_finite(model_cfg, data_cfg, cb_cfg, run_cfg)  # a recipe's were refused naming the file
    return model_cfg, data_cfg, cb_cfg, run_cfg


def _refuse_non_finite(*configs: Any) -> None:
    """A NaN or infinite float setting from the command line (`--learning_rate inf`), refused naming it."""
    for config in configs:
        for f in fields(config):
            value = getattr(config, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name} must be a finite number, got {value}")

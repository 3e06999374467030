"""Reading configs from YAML, with dot-path overrides and errors that name file and field.

    cfg = load_experiment_config("configs/demo_single.yaml", ["train.lr=0.005"])

Every mistake becomes a :class:`~autoassign.errors.ConfigError` whose message names the file
and the field path, e.g. ``configs/x.yaml: train.lr: Input should be greater than 0``.
The helpers are generic over the pydantic model so that a config embedding
``ExperimentConfig`` (a sweep) reuses them: :func:`load_yaml_model`, :func:`apply_overrides`
and :func:`check_field_path`.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from autoassign.config import ExperimentConfig
from autoassign.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)


def load_experiment_config(path: str | Path, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Read an :class:`ExperimentConfig` from YAML, then apply ``key.path=value`` overrides.

    Raises:
        ConfigError: as :func:`load_yaml_model`, and also when the file is empty or holds
            only comments (all defaults is never a usable experiment, so it is taken for a
            mistake rather than silently trained on).
    """
    path = Path(path)
    data = read_yaml_mapping(path)
    if not data:
        raise ConfigError(
            f"{path}: the file is empty; an experiment config needs at least "
            "model.num_classes and data (see configs/demo_single.yaml)"
        )
    return _model_from_mapping(path, data, ExperimentConfig, overrides)


def load_yaml_model(
    path: str | Path, model_cls: type[ModelT], overrides: Iterable[str] = ()
) -> ModelT:
    """Read ``model_cls`` from a YAML file (``yaml.safe_load``), applying dot-path overrides.

    Raises:
        ConfigError: the file is missing or not YAML, its top level is not a mapping, an
            override names no field of ``model_cls`` or has no ``=``, or validation fails
            (one line per problem, each ``<file>: <field.path>: <message>``).
    """
    path = Path(path)
    return _model_from_mapping(path, read_yaml_mapping(path), model_cls, overrides)


def _model_from_mapping(
    path: Path, data: dict[str, Any], model_cls: type[ModelT], overrides: Iterable[str]
) -> ModelT:
    """Check and apply the overrides to the mapping read from ``path``, then validate it."""
    overrides = list(overrides)
    for override in overrides:
        key, _ = parse_override(override)
        try:
            check_field_path(model_cls, key)
        except ConfigError as error:
            raise ConfigError(f"{path}: override {override!r}: {error}") from None
    data = apply_overrides(data, overrides)
    return validate_model(data, model_cls, source=str(path), overrides=overrides)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file.

    An empty (or comments-only) file is an empty mapping; callers that need content say so
    themselves (:func:`load_experiment_config`).
    """
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a text file ({error.reason})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def parse_override(override: str) -> tuple[str, Any]:
    """``"train.lr=0.005"`` -> ``("train.lr", 0.005)``; the value is parsed as YAML."""
    key, sep, raw_value = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form key.path=value")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"override {override!r}: value is not valid YAML: {problem}") from None
    return key, value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``a.b.c=value`` override set, creating missing mappings.

    Only the structure is checked here (a path cannot go through a non-mapping value); which
    keys exist is the schema's business (:func:`check_field_path`, then validation).
    """
    result = _deep_copy_mappings(data)
    for override in overrides:
        key, value = parse_override(override)
        parts = key.split(".")
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                prefix = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"override {override!r}: {prefix} is a {type(child).__name__}, not a mapping"
                )
            node = child
        node[parts[-1]] = value
    return result


def check_field_path(model_cls: type[BaseModel], dotted_path: str) -> None:
    """Raise :class:`ConfigError` unless ``dotted_path`` names a field of ``model_cls``.

    Mappings with free keys (``dict[str, X]``) accept any key and continue into ``X``.
    """
    parts = dotted_path.split(".")
    annotation: Any = model_cls
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "the top level"
        models, mapping_values = _field_containers(annotation)
        if models:
            matches = [m.model_fields[part] for m in models if part in m.model_fields]
            if matches:
                annotation = matches[0].annotation
                continue
            known = sorted({name for m in models for name in m.model_fields})
            raise ConfigError(f"unknown field {part!r} in {where} (known: {', '.join(known)})")
        if mapping_values is not None:
            annotation = mapping_values
            continue
        raise ConfigError(f"{'.'.join(parts[:depth])} has no sub-fields (cannot set {part!r})")


def validate_model(
    data: Mapping[str, Any],
    model_cls: type[ModelT],
    *,
    source: str,
    overrides: Iterable[str] = (),
) -> ModelT:
    """``model_cls.model_validate(data)``, turning a ValidationError into a ConfigError."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source, overrides)) from None


def format_validation_error(
    error: ValidationError, source: str, overrides: Iterable[str] = ()
) -> str:
    """One line per problem: ``<source>: <field.path>: <message>``, noting overrides."""
    override_keys = {parse_override(o)[0]: o for o in overrides}
    lines = []
    for item in error.errors(include_url=False):
        loc = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        line = f"{source}: {loc}: {message}"
        origin = next((o for key, o in override_keys.items() if _is_prefix(key, loc)), None)
        if origin is not None:
            line += f" (from override {origin!r})"
        lines.append(line)
    return "\n".join(lines)


def dump_config(config: BaseModel) -> str:
    """The config as YAML text, every field written out (what :func:`load_yaml_model` reads)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def write_resolved_config(config: BaseModel, path: str | Path) -> Path:
    """Write :func:`dump_config` to ``path`` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(config), encoding="utf-8")
    return path


def _is_prefix(key: str, loc: str) -> bool:
    return loc == key or loc.startswith(key + ".") or key.startswith(loc + ".")


def _deep_copy_mappings(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy_mappings(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def _field_containers(annotation: Any) -> tuple[list[type[BaseModel]], Any | None]:
    """The pydantic models an annotation can hold, and the value type of a ``dict[str, X]``."""
    models: list[type[BaseModel]] = []
    mapping_values = None
    for candidate in _union_members(annotation):
        origin = typing.get_origin(candidate)
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            models.append(candidate)
        elif origin in (dict, Mapping) or (
            isinstance(origin, type) and issubclass(origin, Mapping)
        ):
            args = typing.get_args(candidate)
            mapping_values = args[1] if len(args) == 2 else Any
    return models, mapping_values


def _union_members(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        members = []
        for arg in typing.get_args(annotation):
            members.extend(_union_members(arg))
        return members
    if origin is typing.Annotated:
        return _union_members(typing.get_args(annotation)[0])
    return [annotation]

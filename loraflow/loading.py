"""Loading a config: YAML → overrides (`--set key=value`) → paths resolved against the config file's folder →
validation, with every problem reported at once (field path, did-you-mean) in one ConfigError.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from loraflow.config import CONFIGS, ClassifierConfig, GenerativeConfig, TaskConfig, validate_config
from loraflow.errors import ConfigError, did_you_mean


def _model_fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        annotation = field.annotation
        nested = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        models = [a for a in nested if issubclass(a, BaseModel)]
        if not models:
            return []
        model = models[0]
    return list(model.model_fields)


def _format_errors(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        loc = tuple(item["loc"])
        model: type[BaseModel] = GenerativeConfig
        if loc and loc[0] in CONFIGS:  # the union's tag: which approach's config reported it
            model, loc = CONFIGS[loc[0]], loc[1:]
        path = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            hint = did_you_mean(str(loc[-1]), _model_fields_at(model, loc[:-1]))
            problems.append(f"{path}: unknown key{hint}")
        elif item["type"] == "missing":
            problems.append(f"{path}: required field missing")
        else:
            message = item["msg"].removeprefix("Value error, ")
            head = message.partition(": ")[0]
            if " " not in head and head.split(".")[0] in _model_fields_at(model, loc):  # names its own field
                problems.append(f"{path}.{message}" if loc else message)
                continue
            value = item.get("input")
            shown = f" (got {value!r})" if value is not None and not isinstance(value, dict | list) else ""
            problems.append(f"{path}: {message}{shown}")
    return problems


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in nested mappings, creating sections as needed; a value in the way is a ConfigError."""
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`key.sub=value` strings (value parsed as YAML) into pairs; a malformed one is a ConfigError."""
    pairs = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_steps=20")
        pairs.append((key.strip(), yaml.safe_load(value) if value else ""))
    return pairs


_PATH_FIELDS = (
    ("data", "train"),
    ("data", "dev"),
    ("data", "corrections"),
    ("contract", "extra_suite"),
    ("output_dir",),
    ("registry",),
    ("compute", "storage"),
)


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    for keys in _PATH_FIELDS:
        node: Any = raw
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str | Path):
            if "://" in str(node[keys[-1]]):  # an fsspec URL, not a local path
                continue
            path = Path(node[keys[-1]]).expanduser()
            # abspath, not resolve: a symlink loop must reach the reader, which says what it is
            node[keys[-1]] = str(path if path.is_absolute() else os.path.abspath(base / path))
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("name"), str):
        candidate = base / model["name"]
        if model["name"].startswith((".", "/", "~")) or (candidate.is_dir() and "/" in model["name"]):
            model["name"] = str(
                Path(model["name"]).expanduser()
                if model["name"].startswith(("/", "~"))
                else candidate.resolve()
            )


def absolute_paths(config: TaskConfig, base: Path) -> GenerativeConfig | ClassifierConfig:
    """The config with every relative path in it (data files, extra suite, output_dir, registry, a local
    exchange storage folder, a local model folder) resolved against `base`; absolute ones unchanged."""
    raw = config.model_dump(mode="json")
    _resolve_paths(raw, base)
    return validate_config(raw)


def load_config(path: str | Path, overrides: list[str] | None = None) -> GenerativeConfig | ClassifierConfig:
    """Read, override and validate a YAML config; every problem is reported in one ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(f"{path}: invalid YAML at {where}: {e.problem}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason}); save the config as UTF-8") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, prompt, model, ...) at the top")
    raw.setdefault("name", path.parent.name if path.stem == "config" else path.stem)
    raw.setdefault("output_dir", "runs")
    raw.setdefault("registry", "models")
    for key, value in parse_overrides(overrides or []):
        set_dotted(raw, key, value)
    _resolve_paths(raw, path.parent.resolve())
    try:
        return validate_config(raw)
    except ValidationError as e:
        problems = _format_errors(e)
        raise ConfigError(
            f"{path}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems)
        ) from e


def _to_generative(raw: dict[str, Any]) -> dict[str, Any]:
    """A classifier config's raw settings as the generative approach's, asking the same input text: the
    join template (or the text columns, joined by blank lines) becomes the user message."""
    classifier = raw.pop("classifier", None) or {}
    columns = raw["data"].get("text_columns") or []
    template = classifier.get("template") or "\n\n".join(f"{{{c}}}" for c in columns)
    return raw | {"approach": "generative", "prompt": {"system": "", "template": template}}


def _to_classifier(raw: dict[str, Any]) -> dict[str, Any]:
    """A generative config's raw settings as the classifier approach's: the user message template joins
    the same columns into the text the head reads (the system message has no part in it)."""
    prompt = raw.pop("prompt", None) or {}
    return raw | {"approach": "classifier", "classifier": {"template": prompt.get("template")}}


_INTO_APPROACH = {"generative": _to_generative, "classifier": _to_classifier}


def with_settings(
    config: TaskConfig, settings: dict[str, Any], where: str
) -> GenerativeConfig | ClassifierConfig:
    """The config with each dotted setting replaced (`approach` first: the other approach's config asks
    the same input text), validated; the problems are one ConfigError that starts with `where`."""
    raw = config.model_dump(mode="json")
    target = settings.get("approach", raw["approach"])
    if target != raw["approach"] and target in _INTO_APPROACH:
        raw = _INTO_APPROACH[target](raw)
    for key, value in settings.items():
        if key != "approach":
            set_dotted(raw, key, value)
    try:
        return validate_config(raw)
    except ValidationError as e:
        problems = _format_errors(e)
        raise ConfigError(f"{where}: " + "; ".join(problems)) from e


def dump_config(config: TaskConfig) -> str:
    """The resolved config as YAML (what a run folder's config.yaml holds)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

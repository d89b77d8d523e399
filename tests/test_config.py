"""The config schema: shipped YAMLs load, every error is reported at once with its path and a hint."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraflow.config import LoraflowConfig, load_config, normalize_label, template_fields
from loraflow.errors import ConfigError

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted(REPO.glob("examples/*/config.yaml")), ids=lambda p: p.parent.name)
def test_every_shipped_config_loads(path: Path) -> None:
    config = load_config(path)
    assert config.data.train.is_absolute() and config.data.train.is_file()
    assert config.output_dir.is_absolute()


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "task.yaml"
    path.write_text("data: {train: t.tsv, label_column: y}\nprompt: {template: '{text}'}\n")
    config = load_config(path)
    assert config.name == "task"
    assert config.data.train == tmp_path / "sub" / "t.tsv"
    assert config.output_dir == tmp_path / "sub" / "runs"
    assert config.input_columns == ["text"]


def test_every_problem_is_reported_at_once_with_paths_and_hints(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "data: {train: t.tsv, text_columns: [requirement]}\n"
        "prompt: {template: 'x {requirement}'}\n"
        "lora: {rank: 8, r: 0}\n"
        "train: {lr: -1, epocs: 2}\n"
    )
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "5 problem(s)" in message
    assert "data.label_column: required field missing" in message
    assert "lora.rank: unknown key (did you mean 'r'?)" in message
    assert "lora.r: Input should be greater than or equal to 1 (got 0)" in message
    assert "train.lr: Input should be greater than 0 (got -1)" in message
    assert "train.epocs: unknown key (did you mean 'epochs'?)" in message


def test_unknown_template_placeholder_fails_at_config_time(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "data: {train: t.tsv, label_column: y, text_columns: [requirement, sample_data]}\n"
        "prompt: {template: 'Is {requirment} met by {sample_data}?'}\n"
    )
    with pytest.raises(ConfigError, match=r"\{requirment\} \(did you mean 'requirement'\?\) not in"):
        load_config(path)


def test_literal_braces_in_the_template_are_not_placeholders() -> None:
    assert template_fields('JSON like {{"a": 1}} for {text} and {text}') == ["text"]
    with pytest.raises(ValueError, match="not a plain"):
        template_fields("{text:>10}")


def test_invalid_yaml_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: [a.tsv\n  label_column: y\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+, column \d+"):
        load_config(path)


def test_overrides_use_dotted_keys_and_yaml_values(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: t.tsv, label_column: y}\nprompt: {template: '{text}'}\n")
    config = load_config(path, ["train.max_steps=7", "lora.target_modules=[q_proj, v_proj]", "name=other"])
    assert config.train.max_steps == 7
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.name == "other"
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["train.max_steps"])


def test_generative_config_needs_a_prompt(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: t.tsv, label_column: y}\n")
    with pytest.raises(ConfigError, match="needs a `prompt` section"):
        load_config(path)


def test_config_is_frozen_and_its_json_schema_renders_a_form() -> None:
    schema = LoraflowConfig.model_json_schema()
    assert {"data", "prompt", "model", "lora", "train", "eval", "output_dir"} <= set(schema["properties"])
    assert schema["$defs"]["LoraSettings"]["properties"]["r"]["description"].startswith("LoRA rank")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, "1"),
        (1.0, "1"),
        ("1", "1"),
        (" 1.0 ", "1"),
        (True, "true"),
        (0.5, "0.5"),
        ("fresh", "fresh"),
        ("1e3", "1e3"),
        (-2.0, "-2"),
    ],
)
def test_labels_from_any_spreadsheet_normalise_to_one_text(value: object, expected: str) -> None:
    assert normalize_label(value) == expected


@pytest.mark.parametrize(
    ("heading", "sections"),
    [
        ("## Your own spreadsheet", ("data", "prompt", "model", "lora", "train", "eval", "contract")),
        (
            "## A classification head instead",
            ("data", "classifier", "model", "lora", "train", "eval", "contract"),
        ),
    ],
    ids=["generative", "classifier"],
)
def test_the_readme_configs_are_complete_and_valid(heading: str, sections: tuple[str, ...]) -> None:
    text = (REPO / "README.md").read_text()
    block = text.split(heading, 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    raw = __import__("yaml").safe_load(block)
    config = LoraflowConfig.model_validate(raw)
    documented = {
        (section, key) for section, values in raw.items() if isinstance(values, dict) for key in values
    }
    for section in sections:
        fields = type(getattr(config, section)).model_fields
        missing = [f for f in fields if (section, f) not in documented]
        assert not missing, f"README config lacks {section}.{missing}"


def test_prefect_yaml_deployment_parameters_are_valid_configs() -> None:
    deployments = __import__("yaml").safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert deployments
    for deployment in deployments:
        config = LoraflowConfig.model_validate(deployment["parameters"]["config"])
        assert (
            deployment["entrypoint"]
            == {
                "generative": "flows/generative.py:train_generative",
                "classifier": "flows/classifier.py:train_classifier",
            }[config.approach]
        )
        assert (REPO / config.data.train).is_file() and (REPO / config.data.dev).is_file()
        assert config.contract.extra_suite is None or (REPO / config.contract.extra_suite).is_file()
    assert {d["entrypoint"] for d in deployments} >= {
        "flows/generative.py:train_generative",
        "flows/classifier.py:train_classifier",
    }

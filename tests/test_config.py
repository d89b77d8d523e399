"""The config schema: shipped YAMLs load, every error is reported at once with its path and a hint."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraflow.config import GenerativeConfig, normalize_label, template_fields, validate_config
from loraflow.errors import ConfigError
from loraflow.loading import load_config

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
    assert config.registry == tmp_path / "sub" / "models" and config.compute.gpu_deployment is None


def test_exchange_storage_is_a_path_or_an_fsspec_url_and_the_gpu_deployment_names_its_flow(
    tmp_path: Path,
) -> None:
    path = tmp_path / "task.yaml"
    path.write_text("data: {train: t.tsv, label_column: y}\nprompt: {template: '{text}'}\n")
    local = load_config(path, ["compute.storage=exchange", "compute.gpu_deployment=fit/gpu"])
    assert local.compute.storage == str(tmp_path / "exchange")
    remote = load_config(path, ["compute.storage=s3://bucket/loraflow"])
    assert remote.compute.storage == "s3://bucket/loraflow"  # a URL is not resolved as a path
    with pytest.raises(ConfigError, match="expected FLOW/DEPLOYMENT such as fit/gpu"):
        load_config(path, ["compute.gpu_deployment=gpu"])
    with pytest.raises(ConfigError, match="compute.processes"):
        load_config(path, ["compute.processes=0"])


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
    schema = GenerativeConfig.model_json_schema()
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
        (
            "## Your own spreadsheet",
            ("data", "prompt", "model", "lora", "train", "eval", "contract", "compute", "hub"),
        ),
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
    config = validate_config(raw)
    documented = {
        (section, key) for section, values in raw.items() if isinstance(values, dict) for key in values
    }
    for section in sections:
        fields = type(getattr(config, section)).model_fields
        missing = [f for f in fields if (section, f) not in documented]
        assert not missing, f"README config lacks {section}.{missing}"


ENTRYPOINTS = {
    "generative": "flows/generative.py:train_generative",
    "classifier": "flows/classifier.py:train_classifier",
}


SWEEP = "flows/sweep.py:sweep"


def _deployments_with_config() -> list[dict]:
    """prefect.yaml's deployments that carry a config (not fit/gpu, started by the training flows with
    theirs, nor predict/*, which takes a model)."""
    deployments = __import__("yaml").safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    return [d for d in deployments if "config" in d.get("parameters", {})]


def test_prefect_yaml_deployment_parameters_are_valid_configs() -> None:
    deployments = _deployments_with_config()
    for deployment in deployments:
        config = validate_config(deployment["parameters"]["config"])
        if deployment["entrypoint"] == "flows/retrain.py:retrain":
            assert deployment["schedules"] and deployment["triggers"][0]["match"] == {
                "prefect.resource.id": f"loraflow.dataset.{config.name}"
            }
        elif deployment["entrypoint"] == SWEEP:
            assert config.sweep and config.compute.gpu_deployment == "fit/gpu"  # trials train on the pool
        else:
            assert deployment["entrypoint"] == ENTRYPOINTS[config.approach]
        assert (REPO / config.data.train).is_file() and (REPO / config.data.dev).is_file()
        assert config.contract.extra_suite is None or (REPO / config.contract.extra_suite).is_file()
    entrypoints = {d["entrypoint"] for d in deployments}
    assert entrypoints == {*ENTRYPOINTS.values(), "flows/retrain.py:retrain", SWEEP}
    everything = __import__("yaml").safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    others = {d["entrypoint"]: d for d in everything if d not in deployments}
    assert set(others) == {"flows/fit.py:fit", "flows/predict.py:predict"}
    assert all(d["work_pool"]["name"] == "gpu" for d in everything)
    predict = others["flows/predict.py:predict"]["parameters"]
    assert (REPO / predict["input"]).is_file() and predict["model"].startswith("models/")


def test_prefect_yaml_deployments_train_the_examples_as_configured() -> None:
    """A deployment of an example's config runs exactly its config.yaml (no drift between the two)."""
    from loraflow.loading import absolute_paths

    for deployment in _deployments_with_config():
        config = validate_config(deployment["parameters"]["config"])
        settled = absolute_paths(config, REPO)  # deployments run from the repository root
        example = load_config(REPO / "examples" / config.name / "config.yaml")
        if deployment["entrypoint"] == SWEEP:  # the same trials; where each one trains is the deployment's
            example = example.model_copy(
                update={"compute": settled.compute, "sweep": example.sweep.model_copy(update={"parallel": 2})}
            )
        assert settled == example, deployment["name"]

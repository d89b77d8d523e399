"""The model folder's manifest, loraflow.json: a typed record of how a merged model turns rows into inputs.

No torch here: the predict flow reads it to check an input table's columns before any model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loraflow.config import PromptSettings, template_fields

MANIFEST_FILE = "loraflow.json"


class CardUsage(BaseModel):
    """How the merged model is used, for its model card: the hub's pipeline tag and a usage snippet."""

    model_config = ConfigDict(frozen=True)

    pipeline_tag: str
    usage: str


class ModelManifest(BaseModel):
    """loraflow.json in a merged model folder: which approach made it and how rows become model inputs.

    Written by each approach's merge; read by predict, the registry's champion scoring and the model card.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")  # a newer loraflow may add fields

    approach: Literal["generative", "classifier"]
    labels: list[str] = Field(description="Labels in id / answer order.")
    columns: list[str] = Field(description="The table columns the model reads.")
    trust_remote_code: bool = False
    merge_check: dict[str, float | str] = Field(
        default_factory=dict,
        description="Rows and max |Δ| of the merge, and the model it was checked against.",
    )
    card: CardUsage | None = None
    # the generative approach
    prompt: PromptSettings | None = None
    answers: list[str] | None = Field(None, description="Each label's answer text, in label order.")
    # the classifier approach
    label2id: dict[str, int] | None = None
    template: str | None = Field(None, description="The classifier's join template, if any.")
    max_length: int | None = Field(None, description="Tokens per row the classifier was trained with.")

    @model_validator(mode="before")
    @classmethod
    def _columns_of_older_models(cls, data: Any) -> Any:
        """A generative model merged before `columns` was recorded reads its template's placeholders."""
        if isinstance(data, dict) and "columns" not in data and isinstance(data.get("prompt"), dict):
            data = data | {"columns": template_fields(data["prompt"]["template"])}
        return data

    def write(self, folder: Path) -> None:
        """Write loraflow.json into `folder`."""
        (folder / MANIFEST_FILE).write_text(self.model_dump_json(indent=1, exclude_none=True))

    @classmethod
    def read(cls, folder: str | Path) -> ModelManifest | None:
        """The manifest of the merged model in `folder`, or None when it has none (not a loraflow model)."""
        path = Path(folder) / MANIFEST_FILE
        return cls.model_validate_json(path.read_text()) if path.is_file() else None

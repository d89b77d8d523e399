"""loraflow's Prefect flows (installed as loraflow.flows): one module per flow, each only wiring tasks."""

from __future__ import annotations

import importlib
from typing import Any


def training_flow(approach: str) -> Any:
    """The training flow of an approach: `train_<approach>` in the module of the same name."""
    return getattr(importlib.import_module(f"{__name__}.{approach}"), f"train_{approach}")

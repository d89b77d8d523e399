"""The `validate-data` flow: ingest and the data contract only, no model. `loraflow validate CONFIG.yaml`."""

from __future__ import annotations

from prefect import flow

from loraflow.config import LoraflowConfig
from loraflow.tasks.contracts import check_contract
from loraflow.tasks.ingest import ingest_table
from loraflow.tasks.paths import settle_paths, work_store


@flow(name="validate-data")
def validate_data(config: LoraflowConfig) -> str:
    """Read the configured tables and check the data contract; returns the contract folder."""
    config = settle_paths(config)
    store = work_store(config)
    splits = ingest_table(config.data, config.input_columns, store)
    return check_contract(splits, config.input_columns, config.contract, store).path

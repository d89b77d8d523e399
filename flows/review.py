"""The `review-data` flow: ingest, the data contract and the data review; no model.

`loraflow review CONFIG.yaml` runs it and prints where review.xlsx is.
"""

from __future__ import annotations

from prefect import flow

from loraflow.config import LoraflowConfig
from loraflow.tasks.contracts import check_contract
from loraflow.tasks.ingest import ingest_table
from loraflow.tasks.paths import settle_paths, work_store
from loraflow.tasks.review import review_data, reviewed_template, write_review


@flow(name="review-data")
def review(config: LoraflowConfig) -> str:
    """Read the configured tables, check the contract, review the rows; returns the review.xlsx written."""
    config = settle_paths(config)
    store = work_store(config)
    splits = ingest_table(config.data, config.input_columns, store)
    check_contract(splits, config.input_columns, config.contract, store, config.review)
    findings = review_data(splits, config.input_columns, reviewed_template(config), config.review, store)
    return write_review(findings, config)

"""The `predict` flow: label every row of a table with a merged loraflow model of either approach.

Run it with `loraflow predict --model RUN_FOLDER_OR_MODEL --input FILE --output FILE`, or deploy it
(prefect.yaml) and start it with `prefect deployment run predict/<deployment> -p input=… -p output=…`.
"""

from __future__ import annotations

from prefect import flow

from loraflow.tasks.approaches import predict_rows
from loraflow.tasks.paths import settle_predict_paths
from loraflow.tasks.predict import (
    check_input,
    model_inputs,
    read_input,
    scratch_store,
    write_predictions,
)


@flow(name="predict")
def predict(
    model: str,
    input: str,
    output: str,
    sheet: str | int = 0,
    header_row: int = 1,
    encoding: str = "utf-8",
    batch_size: int = 16,
    separator: str | None = None,
) -> str:
    """Paths → model card → read the input → check its columns → predict in batches → write the rows and
    their predictions.

    `model` is a run folder, its merged/ folder or models/<name>/production; `output` ends in .xlsx, .csv,
    .tsv or .parquet; `sheet`, `header_row`, `encoding` and `separator` read the input as the data settings
    do.
    Relative paths resolve against the flow run's working directory.
    """
    model, input, output = settle_predict_paths(model, input, output)
    columns = model_inputs(model)
    rows = read_input(input, columns, sheet, header_row, encoding, scratch_store(), separator)
    check_input(rows, columns, input)
    predictions = predict_rows(model, rows, batch_size)
    return write_predictions(rows, predictions, output)

"""python bench/serve_litserve.py MODEL PORT (started by `bench/serve_load.py --litserve`)

The model `loraflow serve` would serve, with the same scorer (tasks/serving.py), behind LitServe instead:
one row per request, batches of up to 16 rows within 10 ms, one CPU worker process. LitServe is not a
loraflow dependency: install it apart (`pip install --target DIR litserve pyzmq`, then PYTHONPATH=DIR).
"""

# No `from __future__ import annotations`: LitServe (FastAPI) reads decode_request's annotation for the body.
import sys
from typing import Any

import litserve as ls
import pandas as pd

from loraflow.tasks.serving import load_served


class Rows(ls.LitAPI):
    """{"rows": [row]} → {"probabilities": [...]}, batched by LitServe."""

    def __init__(self, model: str) -> None:
        super().__init__(max_batch_size=16, batch_timeout=0.01)
        self.model_path = model

    def setup(self, device: str) -> None:
        self.model = load_served(self.model_path)

    def decode_request(self, request: dict[str, Any]) -> dict[str, str]:
        return request["rows"][0]

    def predict(self, rows: list[dict[str, str]]) -> list[list[float]]:
        frame = pd.DataFrame(rows, columns=self.model.manifest.columns)
        return self.model.probabilities(frame, 16).tolist()

    def encode_response(self, probabilities: list[float]) -> dict[str, Any]:
        return {"probabilities": probabilities}


if __name__ == "__main__":
    server = ls.LitServer(Rows(sys.argv[1]), accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=int(sys.argv[2]), generate_client_file=False)

"""`loraflow serve MODEL [--host 127.0.0.1] [--port 8000]`: a trained model behind HTTP.

MODEL is a run folder, its merged/ folder or a registry's models/<name>/production. Endpoints:
`POST /predict` (rows as JSON objects with the model's input columns → each row's label and per-label
probabilities, the same numbers `loraflow predict` writes), `GET /health`, `GET /info`, and the OpenAPI
schema at /openapi.json (/docs renders it).

- Dynamic batching: requests wait in one queue; the batcher takes the first one and whatever arrives within
  --max-wait-ms, up to --max-batch rows, and scores them together in one worker thread (the event loop
  stays free: /health answers while a batch runs) through the approach's own scorer, which sorts the rows
  by token length and runs them --max-batch at a time (tasks/serving.py; the same code as predict).
- Hot swap: when MODEL is a symlink (the registry's production link), it is polled every
  --poll-seconds; a new target is loaded beside the serving model and scores a row, then the batcher's
  model is switched between two batches (each batch is scored entirely by one model, each response names
  its version) and the old one is released once its last batch is answered. A new champion that reads
  other columns than the serving one is not swapped in (the request schema would change under the
  clients): the server logs why and keeps serving; restart it to serve that model.
- Bad requests get a 422 naming each field and the fix; scoring errors a 500; the server keeps running.
  It listens on 127.0.0.1 unless told otherwise; with LORAFLOW_SERVE_TOKEN set, every endpoint but
  /health wants `Authorization: Bearer <token>` (401 without it); the token is never logged.

FastAPI + uvicorn rather than LitServe, by measurement (bench/results/serve.md: 2 shared CPU cores, the
embedded model, the same scorer and batching settings, 16 concurrent clients): LitServe was on par at
best (10.3 rows/s against this server's 8.1-11.6) and far slower in three of four runs (0.7-1.4 rows/s,
p99 up to 39 s; not profiled: its inference worker is a separate process polling its queue beside an API
server process). It does not clearly win; a hot swap across its worker processes would need a protocol
of its own, where in one process it is one reference switched between two batches; and FastAPI and
uvicorn come with Prefect, where LitServe would be a new dependency.
"""

# No `from __future__ import annotations`: FastAPI reads /predict's body type, a model built at run time for
# the served model's columns, from the endpoint's annotation, which must then be the class itself.

import asyncio
import contextlib
import logging
import secrets
import time
import weakref
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraflow.errors import did_you_mean, shown, shown_error
from loraflow.tasks.serving import ServedModel, link_changed, load_served, watched_link

TOKEN_ENV = "LORAFLOW_SERVE_TOKEN"
OPEN_PATHS = ("/health",)  # answered without the token: process managers and load balancers probe it
MAX_PROBLEMS = 20  # problems listed in one 422; the rest are counted
log = logging.getLogger("loraflow.serve")


@dataclass(frozen=True)
class ServeSettings:
    """How the server batches, limits requests and follows a registry link."""

    max_batch: int = 32  # rows scored together (and per forward pass); more = throughput, less = latency
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for others to join it
    max_rows: int = 256  # rows per request; more is a 422 (split the rows into several requests)
    max_chars: int = 4000  # characters per input cell; more is a 422 (a long prompt holds up its whole batch)
    max_body_bytes: int = 1 << 20  # request body size; more is a 422
    poll_seconds: float = 5.0  # how often a registry link is checked for a new champion
    # the bearer token every endpoint but /health requires (LORAFLOW_SERVE_TOKEN); never in a repr or a log
    token: str | None = field(default=None, repr=False)


class Prediction(BaseModel):
    """One row's answer."""

    label: str = Field(description="The most likely label (argmax of the probabilities).")
    probabilities: dict[str, float] = Field(description="Each label's probability; they sum to 1.")


class PredictResponse(BaseModel):
    """The rows' predictions, in request order, and the model version that scored all of them."""

    version: str = Field(description="The model version that answered (a registry version's run timestamp).")
    predictions: list[Prediction]


class Health(BaseModel):
    status: str = "ok"
    version: str = Field(description="The model version serving now.")


class Info(BaseModel):
    """The serving model and the server's settings."""

    approach: str
    labels: list[str]
    columns: list[str] = Field(description="The columns each row must have: the model's input columns.")
    base_model: str | None
    run: str | None = Field(description="The run folder the model was trained in, when known.")
    metrics: dict[str, dict[str, float]] | None = Field(description="Dev (finetuned) and test metrics.")
    version: str = Field(description="The model version serving now.")
    folder: str
    following: str | None = Field(description="The registry link the server follows (None: a fixed model).")
    swaps: int = Field(description="How many times a new champion has been swapped in since the start.")
    settings: dict[str, int | float] = Field(description="Batching and request limits (the serve options).")


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty or blank")
    return value


Text = Annotated[str, AfterValidator(_not_blank)]


def request_model(columns: list[str], max_rows: int, max_chars: int) -> type[BaseModel]:
    """The /predict body for a model reading `columns`: {"rows": [{column: text, ...}, ...]}, other keys in a
    row allowed (and ignored), as `loraflow predict` keeps a table's other columns."""
    cells = {
        f"column_{i}": (
            Text,
            Field(alias=name, max_length=max_chars, description=f"Text of the input column '{name}'."),
        )
        for i, name in enumerate(columns)
    }
    row = create_model("Row", __config__=ConfigDict(extra="allow"), **cells)
    example = {"rows": [dict.fromkeys(columns, "text")]}
    return create_model(
        "PredictRequest",
        __config__=ConfigDict(extra="forbid", json_schema_extra={"examples": [example]}),
        rows=(
            list[row],
            Field(min_length=1, max_length=max_rows, description=f"1 to {max_rows} rows to label."),
        ),
    )


def _field(loc: tuple[Any, ...]) -> str:
    """("body", "rows", 3, "text") → "rows[3].text"."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _problem(error: dict[str, Any], columns: list[str], settings: ServeSettings) -> dict[str, str]:
    """A pydantic validation error as {field, problem, fix}."""
    loc, kind, given = tuple(error.get("loc", ())), error.get("type", ""), error.get("input")
    place, inner = _field(loc), loc[1:] if loc and loc[0] == "body" else loc
    max_rows = settings.max_rows
    listed = ", ".join(f"'{c}'" for c in columns)
    body = '{"rows": [{' + ", ".join(f'"{c}": "..."' for c in columns) + "}]}"
    if kind == "missing" and len(inner) == 3:
        keys = list(given) if isinstance(given, dict) else []
        problem = f"column '{inner[2]}' is missing{did_you_mean(str(inner[2]), keys)}"
        return {"field": place, "problem": problem, "fix": f"give every row the model's columns {listed}"}
    if kind == "value_error" and len(inner) == 3:
        return {
            "field": place,
            "problem": "text is empty or blank",
            "fix": "send non-blank text, or drop the row",
        }
    if kind == "string_type" and len(inner) == 3:
        what = type(given).__name__ if given is not None else "null"
        return {
            "field": place,
            "problem": f"expected text, got {what} {shown(given, 40)}",
            "fix": 'send each input cell as a JSON string (e.g. "42" for 42)',
        }
    if kind == "string_too_long" and len(inner) == 3:
        return {
            "field": place,
            "problem": f"text longer than {settings.max_chars:,} characters ({len(given):,})",
            "fix": "shorten the text (or raise --max-chars)",
        }
    if kind == "too_long":
        return {
            "field": place,
            "problem": f"more than {max_rows} rows in one request",
            "fix": f"send at most {max_rows} rows per request (split them; the server batches requests)",
        }
    if kind == "too_short":
        return {"field": place, "problem": "no rows", "fix": f"send at least one row: {body}"}
    if kind == "list_type":
        return {"field": place, "problem": "rows is not a list", "fix": f"send a list of rows: {body}"}
    if kind in ("model_type", "dict_type", "model_attributes_type") and len(inner) == 2:
        return {
            "field": place,
            "problem": "a row is not a JSON object",
            "fix": f"send rows as objects: {body}",
        }
    if kind in ("model_type", "dict_type", "model_attributes_type", "missing") and not inner:
        fix = f"send {body} with Content-Type: application/json"
        return {"field": "body", "problem": "the body is not a JSON object", "fix": fix}
    if kind == "extra_forbidden":
        return {"field": place, "problem": "unknown field", "fix": f"the body has one field, rows: {body}"}
    if kind == "missing" and place == "rows":
        return {"field": place, "problem": "rows is missing", "fix": f"send {body}"}
    if kind == "json_invalid":
        return {"field": "body", "problem": "the body is not valid JSON", "fix": f"send JSON: {body}"}
    return {"field": place, "problem": error.get("msg", kind), "fix": f"send a JSON body shaped {body}"}


def _unprocessable(problems: list[dict[str, str]]) -> JSONResponse:
    shown_problems = problems[:MAX_PROBLEMS]
    more = f" (and {len(problems) - MAX_PROBLEMS} more)" if len(problems) > MAX_PROBLEMS else ""
    message = "; ".join(f"{p['field']}: {p['problem']}; {p['fix']}" for p in shown_problems[:3]) + more
    return JSONResponse({"message": message, "detail": shown_problems}, status_code=422)


class _Guard:
    """ASGI middleware before any parsing: the bearer token (401) and the body size (422)."""

    def __init__(self, app: ASGIApp, token: str | None, max_body: int) -> None:
        self.app, self.max_body = app, max_body
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected and scope["path"] not in OPEN_PATHS:
            if not secrets.compare_digest(headers.get(b"authorization", b""), self.expected):
                response = JSONResponse(
                    {"message": f"missing or wrong bearer token; send 'Authorization: Bearer <{TOKEN_ENV}>'"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                return await response(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) <= self.max_body:
            return await self.app(scope, receive, send)
        body, more = bytearray(), scope["method"] not in ("GET", "HEAD")
        while more:  # chunked (or an oversized body, drained up to a bound so the client reads the reply)
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False) and len(body) <= 8 * self.max_body
        if len(body) > self.max_body:
            problem = {
                "field": "body",
                "problem": f"the body is larger than {self.max_body:,} bytes",
                "fix": "send fewer or shorter rows per request (or raise --max-body-bytes)",
            }
            return await _unprocessable([problem])(scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)


@dataclass
class _Pending:
    frame: pd.DataFrame
    answer: asyncio.Future[tuple[np.ndarray, ServedModel]]


class Batcher:
    """One queue of requests, scored in batches by the model serving at the start of each batch."""

    def __init__(self, model: ServedModel, settings: ServeSettings) -> None:
        self.model, self.settings, self.swaps = model, settings, 0
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="loraflow-score")

    async def score(self, frame: pd.DataFrame) -> tuple[np.ndarray, ServedModel]:
        """`frame`'s probabilities and the model that scored them, once its batch is done."""
        answer = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(frame, answer))
        return await answer

    async def run(self) -> None:
        while True:
            await self._answer(await self._collect())

    async def _collect(self) -> list[_Pending]:
        """The first request in the queue and those that join it within --max-wait-ms, up to --max-batch
        rows (the ones already waiting join at once)."""
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        rows, deadline = len(batch[0].frame), loop.time() + self.settings.max_wait_ms / 1000
        while rows < self.settings.max_batch:
            if self.queue.qsize():
                pending = self.queue.get_nowait()
            else:
                try:
                    pending = await asyncio.wait_for(self.queue.get(), deadline - loop.time())
                except TimeoutError:
                    break
            batch.append(pending)
            rows += len(pending.frame)
        return batch

    async def _answer(self, batch: list[_Pending]) -> None:
        """Score the batch with the model serving now (all of it: a swap waits for the next batch) and
        answer each request; its locals, the model among them, go when it returns."""
        model = self.model
        frame = pd.concat([p.frame for p in batch], ignore_index=True)
        try:
            probabilities = await asyncio.get_running_loop().run_in_executor(
                self.worker, model.probabilities, frame, self.settings.max_batch
            )
        except Exception as e:  # a scoring failure fails this batch's requests, not the server
            log.exception("scoring a batch of %d rows failed", len(frame))
            for p in batch:
                if not p.answer.done():
                    p.answer.set_exception(e)
            return
        start = 0
        for p in batch:
            if not p.answer.done():  # a client that went away leaves a cancelled future
                p.answer.set_result((probabilities[start : start + len(p.frame)], model))
            start += len(p.frame)

    def swap(self, new: ServedModel) -> None:
        old, self.model = self.model, new
        self.swaps += 1
        log.info("now serving version %s (%s), was %s", new.version, new.folder, old.version)
        weakref.finalize(old, log.info, "released version %s", old.version)


async def _follow(link: Path, batcher: Batcher, poll: float) -> None:
    """Poll the registry link; load a new champion beside the serving one and swap it in."""
    refused: set[Path] = set()  # targets that read other columns: not served until a restart
    failed: set[Path] = set()  # targets that failed to load: tried again at each poll, logged once
    while True:
        await asyncio.sleep(poll)
        target = link_changed(link, batcher.model.folder)
        if target is None or target in refused:
            continue
        if target not in failed:
            log.info("%s now points at %s: loading it beside version %s", link, target, batcher.model.version)
        try:
            new = await asyncio.to_thread(load_served, target)
        except Exception:  # a broken model: keep serving the old one
            if target not in failed:
                log.exception("loading %s failed; still serving version %s", target, batcher.model.version)
            failed.add(target)
            continue
        if new.manifest.columns != batcher.model.manifest.columns:
            log.error(
                "not swapping to %s: it reads columns %s, the serving model %s; restart loraflow serve to "
                "serve it",
                target,
                new.manifest.columns,
                batcher.model.manifest.columns,
            )
            refused.add(target)
            continue
        batcher.swap(new)
        del new


def create_app(model: ServedModel, settings: ServeSettings, link: Path | None = None) -> FastAPI:
    """The FastAPI app serving `model`; following `link` (a registry's production link) when given."""
    columns = model.manifest.columns
    body = request_model(columns, settings.max_rows, settings.max_chars)
    batcher = Batcher(model, settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(batcher.run())]
        if link is not None:
            tasks.append(asyncio.create_task(_follow(link, batcher, settings.poll_seconds)))
        yield
        for task in tasks:
            task.cancel()
        batcher.worker.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(
        title=f"loraflow: {model.manifest.approach} classifier",
        description=f"Labels rows with the columns {columns} as one of {model.manifest.labels}.",
        lifespan=lifespan,
    )
    app.add_middleware(_Guard, token=settings.token, max_body=settings.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def unprocessable(_: Request, error: RequestValidationError) -> JSONResponse:
        return _unprocessable([_problem(e, columns, settings) for e in error.errors()])

    @app.post("/predict", response_model=PredictResponse)
    async def predict(request: body) -> PredictResponse:  # type: ignore[valid-type]
        """Each row's label and per-label probabilities, as `loraflow predict` computes them."""
        frame = pd.DataFrame(
            [[getattr(row, f"column_{i}") for i in range(len(columns))] for row in request.rows],
            columns=columns,
            dtype=object,
        )
        try:
            probabilities, served = await batcher.score(frame)
        except Exception as e:  # logged by the batcher; the server stays up
            return JSONResponse({"message": f"scoring failed: {shown_error(e)}"}, status_code=500)
        labels = served.manifest.labels
        return PredictResponse(
            version=served.version,
            predictions=[
                Prediction(
                    label=labels[int(np.argmax(p))],
                    probabilities={label: float(v) for label, v in zip(labels, p, strict=True)},
                )
                for p in probabilities
            ],
        )

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        """Answers while a batch is being scored (scoring runs in its own thread)."""
        return Health(version=batcher.model.version)

    @app.get("/info", response_model=Info)
    async def info() -> Info:
        """The serving model: approach, labels, columns, base model, run, metrics and version."""
        return Info(
            **batcher.model.info,
            following=str(link) if link else None,
            swaps=batcher.swaps,
            settings={k: v for k, v in asdict(settings).items() if k != "token"},
        )

    return app


def serve(model: str, host: str, port: int, settings: ServeSettings) -> None:
    """Load MODEL (a ModelError when it is not a loraflow model), then serve it until SIGINT/SIGTERM."""
    import uvicorn

    if not log.handlers:  # its own lines on stderr, whatever Prefect (imported by the tasks) does to logging
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    started = time.perf_counter()
    link = watched_link(model)
    served = load_served(model)
    log.info(
        "loaded version %s (%s, %s) in %.1f s%s",
        served.version,
        served.manifest.approach,
        served.folder,
        time.perf_counter() - started,
        f"; following {link} every {settings.poll_seconds:g} s" if link else "",
    )
    if settings.token is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "listening on %s without %s: anyone who reaches the port can use the model", host, TOKEN_ENV
        )
    app = create_app(served, settings, link)
    del served  # the batcher holds the model: a swap can then release it
    uvicorn.run(app, host=host, port=port, log_level="info")

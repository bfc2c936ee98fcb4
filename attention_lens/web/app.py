"""The local explorer: a starlette app around one model and one lens, a JSON API and a static page.

API (all answers are JSON; errors are {"error": "what was wrong"} with a 4xx status):
- GET  /api/info       lens config, model fingerprint, shape, the default reading ({"name", "label"}) and every
                       reading's label, per-head results (or null; with each head's measured `effects` where the
                       files had them), limits;
- POST /api/decode     {"text", "k"=10, "position"="all", "reading"=the server's} -> the `decode --json` document;
- POST /api/attention  {"text", "layer", "head"} -> {"tokens", "layer", "head", "pattern": [query][key]};
- POST /api/concept    {"text", "concept": "war, battle"} -> {"concept", "scores": {"layer,head": lift}, "top"}.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import strict_json
from ..concepts import make_concept, prompt_lift
from ..decode import decode
from ..errors import AttentionLensError
from ..lens import Lens
from ..models import Model
from ..patterns import attention_patterns
from ..readings import READING_LABELS, READINGS, ChosenReading, choose_reading
from ..report.results import HeadResults

STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class Limits:
    """What one request may ask for: the model is shared, so no request may hold it for long."""

    max_chars: int = 2000
    """Longest prompt, in characters."""
    max_tokens: int = 128
    """Longest prompt, in tokens (every position of every head is decoded)."""
    max_k: int = 50
    """Most top-k tokens per head."""
    max_body_bytes: int = 64 * 1024
    """Largest request body."""
    request_timeout: float = 10.0
    """Seconds a client may take to send its request headers, and again its body; a slower one is dropped
    (408 for a body)."""
    max_connections: int = 32
    """Most open connections (and requests in flight); further requests get 503 until some finish."""


class RequestError(Exception):
    """A client mistake: answered with `status` and a one-line message, never a traceback."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Explorer:
    """The model, lens and results behind the API. The model runs one request at a time (a lock); the
    others wait their turn in worker threads instead of being dropped. A reading other than the default gets its
    corpus statistics (on `prior_data`) the first time a request asks for it."""

    def __init__(self, model: Model, lens: Lens, results: HeadResults | None, limits: Limits, reading: ChosenReading,
                 prior_data: str | None = None):
        self.model, self.lens, self.results, self.limits, self.reading = model, lens, results, limits, reading
        self.prior_data = prior_data
        self._readings = {reading.name: reading}
        self._lock = threading.Lock()
        self._patterns: tuple[str, Any] | None = None  # the last prompt's attention, for clicks on its heads

    def info(self) -> dict:
        return {"lens": dataclasses.asdict(self.lens.config), "model": self.model.fingerprint(),
                "n_layers": self.model.n_layers, "n_heads": self.model.n_heads, "reading": self.reading.to_json(),
                "readings": READING_LABELS,
                "results": self.results.to_json() if self.results is not None else None,
                "limits": dataclasses.asdict(self.limits)}

    def decode(self, body: dict) -> dict:
        text = self._text(body)
        k = _integer(body, "k", 10, 1, self.limits.max_k)
        position = body.get("position", "all")
        if not (position == "all" or (isinstance(position, int) and not isinstance(position, bool))):
            raise RequestError(422, "'position' must be an integer or \"all\"")
        name = body.get("reading", self.reading.name)
        if name not in READINGS:
            raise RequestError(422, f"'reading' must be one of {', '.join(READINGS)}")
        with self._lock:
            self._check_tokens(text)
            if name not in self._readings:
                self._readings[name] = choose_reading(self.model, self.lens, name, self.prior_data)
            return decode(self.model, self.lens, text, k=k, position=position,
                          **self._readings[name].decode_args()).to_json()

    def attention(self, body: dict) -> dict:
        text = self._text(body)
        layer = _integer(body, "layer", None, 0, self.model.n_layers - 1)
        head = _integer(body, "head", None, 0, self.model.n_heads - 1)
        with self._lock:
            input_ids = self._check_tokens(text)
            if self._patterns is None or self._patterns[0] != text:
                self._patterns = (text, attention_patterns(self.model, input_ids))
            pattern = self._patterns[1][layer, head]  # (query pos, key pos)
            tokens = [self.model.token_text(int(i)) for i in input_ids[0]]
        return {"tokens": tokens, "layer": layer, "head": head,
                "pattern": [[round(float(w), 4) for w in row] for row in pattern]}

    def concept(self, body: dict) -> dict:
        """Which heads' lenses promote a concept's tokens on this prompt (the lift of `search`, per prompt)."""
        text = self._text(body)
        words = body.get("concept")
        if not isinstance(words, str) or not words.strip():
            raise RequestError(422, "'concept' must be a non-empty comma list, e.g. \"war, battle, army\"")
        if len(words) > self.limits.max_chars:
            raise RequestError(413, f"the concept has {len(words)} characters; the limit is {self.limits.max_chars}")
        # Split here: read_concept_words treats a path as a file to read, which a web request must never do.
        found = make_concept(self.model.tokenizer, [w.strip() for w in words.split(",") if w.strip()])
        with self._lock:
            lift = prompt_lift(self.lens, found, self._check_tokens(text))
        cells = [{"layer": layer, "head": head, "lift": round(float(lift[i, j]), 4)}
                 for i, layer in enumerate(self.lens.config.layers) for j, head in enumerate(self.lens.config.heads)]
        return {"concept": found.to_json(self.model.tokenizer),
                "scores": {f"{cell['layer']},{cell['head']}": cell["lift"] for cell in cells},
                "top": sorted(cells, key=lambda cell: -cell["lift"])[:10]}

    def _text(self, body: dict) -> str:
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            raise RequestError(422, "'text' must be a non-empty string")
        if len(text) > self.limits.max_chars:
            raise RequestError(413, f"the prompt has {len(text)} characters; the limit is {self.limits.max_chars}")
        return text

    def _check_tokens(self, text: str):
        input_ids = self.model.encode(text)
        if input_ids.shape[1] > self.limits.max_tokens:
            raise RequestError(413, f"the prompt has {input_ids.shape[1]} tokens; the limit is {self.limits.max_tokens}")
        return input_ids


def _integer(body: dict, name: str, default: int | None, low: int, high: int) -> int:
    value = body.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(422, f"'{name}' must be an integer from {low} to {high}")
    return value


class ClientGone(Exception):
    """The client closed the connection before its request body arrived: nothing to answer, no work to do."""


async def _json_body(request: Request, limits: Limits) -> dict:
    """The request's JSON object, read no further than `max_body_bytes` whatever Content-Length claims, and
    within `request_timeout` seconds: a client that stalls mid-body must not hold a connection open forever."""
    max_bytes = limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise RequestError(413, f"the request body is over the {max_bytes}-byte limit")
    raw = bytearray()
    try:
        with anyio.fail_after(limits.request_timeout):
            async for chunk in request.stream():
                raw.extend(chunk)
                if len(raw) > max_bytes:
                    raise RequestError(413, f"the request body is over the {max_bytes}-byte limit")
    except TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {limits.request_timeout:g} s") from None
    except ClientDisconnect:
        raise ClientGone() from None
    try:
        body = strict_json.loads(raw, "the request body")
    except AttentionLensError as error:
        raise RequestError(400, str(error)) from None
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, nesting too deep
        raise RequestError(400, "the request body must be JSON, e.g. {\"text\": \"The capital of France is\"}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return body


def _endpoint(explorer: Explorer, work: Callable[[dict], dict]):
    """A POST handler: parse, run `work` in a worker thread (the model blocks), map mistakes to 4xx."""

    async def handler(request: Request) -> Response:
        try:
            body = await _json_body(request, explorer.limits)
            if await request.is_disconnected():
                raise ClientGone()
            result = await anyio.to_thread.run_sync(work, body)
        except ClientGone:
            return Response(status_code=400)  # no one reads it; the server drops it without a log entry
        except RequestError as error:
            return _error(str(error), error.status)
        except AttentionLensError as error:
            return _error(str(error), 422)
        try:
            return StrictJSONResponse(result)
        except AttentionLensError as error:  # a non-finite number in the result: a failure, not a token
            return _error(str(error), 500)

    return handler


class StrictJSONResponse(JSONResponse):
    """A JSON response that refuses NaN and Infinity with a one-line reason (starlette's raises a traceback)."""

    def render(self, content: Any) -> bytes:
        return strict_json.dumps(content).encode("utf-8")


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(model: Model, lens: Lens, results: HeadResults | None = None, limits: Limits | None = None,
               reading: ChosenReading | None = None, prior_data: str | None = None) -> Starlette:
    """The explorer app; serve it with `run_server` (or any ASGI server). Its token grids show `reading`
    (readings.choose_reading; default raw) unless a request asks for another, whose statistics come from
    `prior_data` (default: the lens's training data, else sotu)."""
    limits = limits or Limits()
    for name, value in dataclasses.asdict(limits).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise AttentionLensError(f"limit {name} must be a positive finite number; got {value!r}")
    explorer = Explorer(model, lens, results, limits, reading or ChosenReading("raw"), prior_data)

    async def index(request: Request) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    async def info(request: Request) -> JSONResponse:
        try:
            return StrictJSONResponse(explorer.info())
        except AttentionLensError as error:
            return _error(str(error), 500)

    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": error.detail}, status_code=error.status_code)

    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/decode", _endpoint(explorer, explorer.decode), methods=["POST"]),
        Route("/api/attention", _endpoint(explorer, explorer.attention), methods=["POST"]),
        Route("/api/concept", _endpoint(explorer, explorer.concept), methods=["POST"]),
        # StaticFiles resolves each path and refuses any that leaves STATIC_DIR (404), symlinks included.
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.limits = explorer.limits  # run_server caps connections with them
    return app

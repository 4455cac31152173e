"""The HTTP app of `vitkit serve`: one model behind an ASGI (Starlette) application.

    POST /v1/classify?top_k=5   image (multipart field `file`, or the raw body) -> top-k labels;
                                with `labels` (query or form fields) a CLIP / SigLIP model
                                scores those names zero-shot (`vitkit.infer.zero_shot`)
    POST /v1/embed              image -> the pooled representation {"embedding", "dim"};
                                `text` (query or form field) -> its text embedding instead
    POST /v1/explain?method=rollout[&label=L]   image -> PNG heat map over it
    POST /v1/search?k=12        with --index: an image (or `text`, CLIP / SigLIP) -> the
                                nearest indexed photos {"results": [{"path", "score"}]}
    GET  /v1/thumbnail?path=P   with --index: a JPEG thumbnail of an indexed photo (of no
                                other file: P must be a row of the index, unchanged since)
    GET  /healthz               200 once the model is loaded and warmed, 503 before
    GET  /metrics               Prometheus text: requests, latency, batch sizes
    GET  /                      a web page to try the model; GET /openapi.json describes the API

Every /v1 route runs behind one guard (`serve.guard`): the access token (`Authorization:
Bearer`, when the server has one), readiness, the queue limit (503 with Retry-After past --max-queue), the body
read within --body-timeout-s and --max-body-mb, a deadline (--timeout-s: work still queued at
its deadline is dropped before the model, 504), and cancellation when the client disconnects.
Explanations hold one of --max-explain slots, so they cannot crowd classification out of the
model thread. SIGTERM drains: new requests get 503 while the admitted ones finish.

Classification and embedding requests go through the dynamic batcher (`serve.batcher`) and the
same preprocessing and model call as `vitkit predict`; decoding runs in a thread pool and the
model in its own thread, so the event loop only moves bytes. The model loads in the background
after the server starts listening, which is what a readiness probe expects.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import math
import os
import signal
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vitkit.checkpoints.resolve import resolve
from vitkit.data.images import load_image
from vitkit.data.labels import id2label_for
from vitkit.distributed import pick_device
from vitkit.errors import ConfigError, VitkitError
from vitkit.explain import HEAD_FUSIONS, METHODS, explain_image, label_index
from vitkit.features import Embedder
from vitkit.infer.exported import check_unchanged, is_exported, load_exported
from vitkit.infer.precision import BACKENDS, PRECISIONS, prepare
from vitkit.infer.predictor import load_folder, preprocess, softmax
from vitkit.infer.warm import top_rows
from vitkit.infer.zero_shot import (
    DEFAULT_TEMPLATE,
    check_labels,
    encode_texts,
    text_dtype_for,
    text_tower,
)
from vitkit.limits import at_least
from vitkit.serve.batcher import Batcher
from vitkit.serve.guard import (
    HeaderLimit,
    authorize,
    batched,
    drain_on_sigterm,
    explain_slot,
    fail,
    guarded,
    in_model_thread,
    log,
)
from vitkit.serve.metrics import CONTENT_TYPE, Metrics
from vitkit.serve.protocol import MAX_HEADER_BYTES, STATE_KEY
from vitkit.viz import png_bytes

ENV_SETTINGS = "VITKIT_SERVE_SETTINGS"
"""Environment variable carrying `Settings` as JSON to each worker process (`--workers N`)."""
ENV_FAILED = "VITKIT_SERVE_FAILED"
"""A path a worker process writes, then stops the parent, when its model cannot be loaded."""

EXPLAIN_MAX_SIDE = 512  # pixels: the longer side of the PNG /v1/explain returns
THUMBNAIL_SIDE = 256  # pixels: the longer side of a /v1/thumbnail JPEG
MAX_SEARCH_K = 100  # results one /v1/search returns at most
TEXT_CACHE = 4096  # text embeddings kept between zero-shot requests
MIN_KEY_CHARS = 16  # an access token shorter than this is refused at start-up


@dataclass
class Settings:
    """What `vitkit serve` was asked for (its command-line flags)."""

    model: str
    precision: str = "fp32"
    backend: str | None = None  # runtime for the precision (None: the fastest installed)
    device: str = "auto"
    max_batch: int = 8
    max_wait_ms: float = 20.0
    max_body_mb: float = 10.0
    threads: int | None = None
    allow_preset: bool = True
    calibration: str | None = None  # a folder of images for static int8 / auto
    image_size: int | tuple[int, int] | None = None  # None: the checkpoint's
    cache: bool = True  # keep prepared precision paths on disk (vitkit.infer.cache)
    max_labels: int = 100  # labels per zero-shot request
    max_text_chars: int = 1000  # characters of one label (with its template) or text
    max_queue: int | None = None  # /v1 requests admitted at once (None: 8 x max_batch)
    timeout_s: float = 30.0  # from a request's body received to its batch: later is dropped
    max_explain: int = 1  # explanations holding the model at once; more wait their turn
    header_timeout_s: float = 10.0  # request line + headers must arrive within this
    body_timeout_s: float = 30.0  # the whole body must arrive within this after the headers
    drain_s: float = 8.0  # SIGTERM: how long admitted requests may take to finish
    api_key: str | None = field(default=None, repr=False)  # Bearer token for /v1 (None: open)
    index: str | None = None  # a `vitkit index` folder for /v1/search (built with this model)
    auth_probes: bool = False  # the token also guards /healthz and /metrics

    def __post_init__(self) -> None:
        if is_exported(self.model):
            check_unchanged(self.model, {
                "--precision": self.precision not in ("fp32", "auto"),
                "--backend": self.backend is not None, "--image-size": self.image_size is not None,
                "--calibration": self.calibration is not None, "--index": self.index is not None,
            })  # fmt: skip
        if isinstance(self.image_size, list):  # back from JSON (--workers)
            self.image_size = (self.image_size[0], self.image_size[1])
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r} is not available; use {PRECISIONS}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ConfigError(f"--backend {self.backend!r} is not available; use {BACKENDS}")
        at_least(self.max_batch, 1, "--max-batch")
        at_least(self.max_wait_ms, 0, "--max-wait-ms")
        if self.max_body_mb <= 0:
            raise ConfigError(f"--max-body-mb must be positive, got {self.max_body_mb}")
        if self.max_labels < 1 or self.max_text_chars < 1:
            raise ConfigError("--max-labels and --max-text-chars must be at least 1")
        if self.auth_probes and self.api_key is None:
            raise ConfigError("--auth-probes needs a token (--api-key-file or $VITKIT_API_KEY)")
        at_least(self.max_queue, 1, "--max-queue")
        at_least(self.max_explain, 1, "--max-explain")
        for flag, value in [("--timeout-s", self.timeout_s), ("drain_s", self.drain_s),
                            ("--header-timeout-s", self.header_timeout_s),
                            ("--body-timeout-s", self.body_timeout_s)]:  # fmt: skip
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{flag} must be a positive number of seconds, got {value}")
        if self.api_key is not None and len(self.api_key) < MIN_KEY_CHARS:
            raise ConfigError(
                f"the access token has {len(self.api_key)} characters; use at least "
                f"{MIN_KEY_CHARS}, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )

    @property
    def queue_limit(self) -> int:
        """--max-queue, or 8 batches' worth: p99 latency stays near 8 x one batch's time."""
        return self.max_queue if self.max_queue is not None else 8 * self.max_batch

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


class Service:
    """The loaded model and what every route shares: processor, labels, pools, batcher, metrics."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics(queue_limit=settings.queue_limit)
        self.model_pool = ThreadPoolExecutor(1, thread_name_prefix="vitkit-model")
        self.decode_pool = ThreadPoolExecutor(
            max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="vitkit-decode"
        )
        batching = dict(max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                        on_batch=self.metrics.observe_batch)  # fmt: skip
        self.batcher = Batcher(self.classify_rows, self.model_pool, **batching)
        self.embed_batcher = Batcher(self.embed_rows, self.model_pool, **batching)
        self.runner: Any = None  # classify: logits at --precision
        self.embed_runner: Any = None  # embed: pooled rows at --precision
        self.state = "loading"  # -> "ready" | "failed"
        self.error: str | None = None
        self.model: Any = None
        self.processor: Any = None
        self.labels: dict[int, str] = {}
        self.device = torch.device("cpu")
        self.image_text: Any = None  # CLIP / SigLIP: both towers, for zero-shot and text
        self.tokenizer: Any = None
        self.text_tower: Any = None  # at the text precision, cast once
        self.text_cache: collections.OrderedDict[str, Tensor] = collections.OrderedDict()
        self.in_flight = 0  # /v1 requests admitted and not yet answered (event loop only)
        self.draining = False  # SIGTERM received: refuse new work, finish the admitted
        self.drain_task: asyncio.Task | None = None
        self.explain_slots = asyncio.Semaphore(settings.max_explain)
        self.index: Any = None  # vitkit.search.Index, with --index
        self.search_encoder: Any = None  # vitkit.search.QueryEncoder: queries as its rows

    # ---------------------------------------------------------------------- model thread
    def load(self) -> None:
        """Resolve, place and warm up the model (runs in the model thread)."""
        s = self.settings
        if s.threads:
            torch.set_num_threads(s.threads)
        self.device = pick_device(s.device)
        if is_exported(s.model):
            self._load_exported()
        else:
            self._load_checkpoint()
        h, w = self.processor.output_hw or self.model.config.image_hw
        for batch in sorted({1, s.max_batch}):  # the first calls allocate and pick kernels
            pixels = torch.zeros(batch, self.processor.num_channels, h, w)
            # (static int8 and auto calibrate on the first real batch without --calibration)
            if self.embed_runner is not None and self.embed_runner.ready:
                self.embed_rows(pixels)
            if self.runner is not None and self.runner.ready:
                self.classify_rows(pixels)
        self.state = "ready"

    def _load_exported(self) -> None:
        """A file `vitkit export` wrote, as it was prepared (`vitkit.infer.exported`): a
        classifier's answers /v1/classify, an encoder's /v1/embed; nothing is converted."""
        model, self.processor = load_exported(self.settings.model)
        self.model, self.device = model, torch.device("cpu")
        self.labels = id2label_for(model.config)
        runner = prepare(model, "fp32", backend="torch", device="cpu", cache=False)
        backend = "onnxruntime" if self.settings.model.lower().endswith(".onnx") else "openvino"
        runner.precision, runner.backend, runner.note = model.precision, backend, "as exported"
        if model.config.num_classes:
            self.runner = runner
        else:
            self.embed_runner = runner

    def _load_checkpoint(self) -> None:
        s = self.settings
        resolved = resolve(s.model, device=self.device, allow_preset=s.allow_preset,
                           image_size=s.image_size, text="auto")  # fmt: skip
        if resolved.random_weights:
            log(f"warning: {s.model!r} is a preset name: RANDOM weights, meaningless answers")
        self.model = resolved.model.eval()
        self.processor = resolved.processor
        self.labels = id2label_for(self.model.config)
        if resolved.image_text is not None and resolved.tokenizer is not None:
            self.image_text, self.tokenizer = resolved.image_text, resolved.tokenizer
            self.text_tower = text_tower(self.image_text, text_dtype_for(s.precision))

        # --precision: the same runners as `vitkit predict` and `vitkit embed`
        calibration = load_folder(s.calibration, self.processor) if s.calibration else None
        if self.model.config.num_classes:
            self.runner = prepare(self.model, s.precision, backend=s.backend, device=self.device,
                                  calibration=calibration, log=log, cache=s.cache)  # fmt: skip
        self.embed_runner = prepare(Embedder(self.model), s.precision, backend=s.backend,
                                    device=self.device, calibration=calibration, log=log,
                                    cache=s.cache)  # fmt: skip
        if s.index is not None:
            self.open_index(resolved)

    def open_index(self, resolved: Any) -> None:
        """Open --index and refuse it unless its rows came from this model and preprocessing."""
        from vitkit.search import QueryEncoder, open_index

        index = open_index(self.settings.index)
        encoder = QueryEncoder(resolved, pool=index.identity["pool"])
        index.check_model(encoder.identity)
        self.index, self.search_encoder = index, encoder

    def search(self, pixels: Tensor | None, text: str | None, k: int) -> list[dict[str, Any]]:
        """The `k` indexed photos nearest to an image (C, H, W) or a text: [{path, score}]."""
        if text is not None:
            rows = self.search_encoder.texts([text])
        else:
            rows = self.search_encoder.pixels(pixels[None])
        scores, hits = self.index.search(rows, k)
        return [{"path": self.index.paths[int(r)], "score": round(float(v), 6)}
                for v, r in zip(scores[0], hits[0]) if r >= 0]  # fmt: skip

    def thumbnail(self, path: str) -> bytes:
        """A JPEG of an indexed photo, at most THUMBNAIL_SIDE pixels a side (decode pool)."""
        import io

        from PIL import Image

        image = load_image(path, max_pixels=self.processor.max_pixels)
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.BICUBIC)
        out = io.BytesIO()
        image.convert("RGB").save(out, "JPEG", quality=85)
        return out.getvalue()

    def classify_rows(self, pixels: Tensor) -> list[Tensor]:
        """(B, C, H, W) -> a (K,) probability row per image, float32 on the CPU: the runner of
        `vitkit predict --precision P`, the same call."""
        return list(softmax(self.runner(pixels.to(self.device)).float()))

    def embed_rows(self, pixels: Tensor) -> list[Tensor]:
        """(B, C, H, W) -> the model's pooled output per image (its image embedding when it
        has a projection, e.g. CLIP), as `vitkit embed` computes it; float32 on the CPU."""
        return list(self.embed_runner(pixels.to(self.device)).float().cpu())

    def text_rows(self, texts: list[str]) -> Tensor:
        """(N, E) text embeddings (not normalised), float32 on the CPU; the last
        `TEXT_CACHE` texts are kept, so a page's labels are embedded once."""
        todo = list(dict.fromkeys(t for t in texts if t not in self.text_cache))
        if todo:
            rows = encode_texts(self.text_tower, self.tokenizer, todo, normalize=False)
            for text, row in zip(todo, rows):
                self.text_cache[text] = row
        for text in texts:
            self.text_cache.move_to_end(text)
        rows = torch.stack([self.text_cache[t] for t in texts])
        while len(self.text_cache) > TEXT_CACHE:
            self.text_cache.popitem(last=False)
        return rows

    def zero_shot(self, image: Tensor, texts: Tensor) -> Tensor:
        """An image embedding (E,) and label embeddings (K, E) -> (K,) zero-shot scores."""
        model = self.image_text
        image, texts = F.normalize(image, dim=-1), F.normalize(texts, dim=-1)
        with torch.no_grad():
            return model.scores(model.logits(image[None], texts.to(image.device)).float())[0]

    def explain(self, data: bytes, method: str, label: int | None, options: dict) -> tuple:
        result, picture = explain_image(
            self.model,
            self.processor,
            data,
            method,
            label=label,
            with_image=False,
            per_head=False,
            max_side=EXPLAIN_MAX_SIDE,
            **options,
        )
        return result, png_bytes(picture)

    # ---------------------------------------------------------------------- decode pool
    def preprocess(self, data: bytes) -> Tensor:
        """Encoded image bytes -> (C, H, W), exactly as `vitkit predict` preprocesses a file."""
        return preprocess(data, self.processor)

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.settings.model,
            "precision": _model_fields(self)["precision"],
            "runtime": (self.runner or self.embed_runner).describe()
            if (self.runner or self.embed_runner) is not None
            else None,
            "device": str(self.device),
            "zero_shot": self.image_text is not None,
            "num_classes": self.model.config.num_classes if self.model is not None else None,
            "input_size": (  # None while loading
                list(self.processor.output_hw or self.model.config.image_hw)
                if self.model is not None
                else None
            ),
            "search": self._search_info(),
        }

    def _search_info(self) -> dict[str, Any] | None:
        """What /v1/search offers: the index's size and kind, and whether texts can query it
        (a text tower and tokenizer, and rows of the model's own embedding)."""
        if self.index is None:
            return None
        r = self.search_encoder.resolved
        text = r.image_text is not None and r.tokenizer is not None
        text = text and self.index.identity["pool"] == "model"
        return {"images": len(self.index), "kind": self.index.kind, "text": text}


def create_app(settings: Settings, *, on_fatal: Callable[[], None] | None = None):
    """The ASGI app for `settings`. The model loads in the background once the app starts;
    if loading fails, /healthz says why (503) and `on_fatal` is called from the loader thread."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    service = Service(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        service.embed_batcher.start()
        loop = asyncio.get_running_loop()

        def load() -> None:
            try:
                service.load()
                log(
                    f"ready: {settings.model} on {service.device} ({service.describe()['precision']})"
                )
            except Exception as exc:  # report any failure: the probe shows it, the CLI exits 1
                service.state, service.error = "failed", _reason(exc)
                log(f"error: cannot load {settings.model}: {service.error}")
                if on_fatal is not None:
                    on_fatal()

        loader = loop.run_in_executor(service.model_pool, load)
        drain_on_sigterm(service, loop)
        try:
            yield {STATE_KEY: settings.header_timeout_s}  # for serve.protocol.Protocol
        finally:
            await service.batcher.stop()
            await service.embed_batcher.stop()
            if not loader.done():
                loader.cancel()
            service.model_pool.shutdown(wait=False, cancel_futures=True)
            service.decode_pool.shutdown(wait=False, cancel_futures=True)

    async def http_error(request, exc: HTTPException):
        return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)

    routes = [
        Route("/", _page, methods=["GET"]),
        Route("/healthz", _probe(_healthz), methods=["GET"]),
        Route("/metrics", _probe(_metrics), methods=["GET"]),
        Route("/openapi.json", _openapi, methods=["GET"], include_in_schema=False),
        Route("/v1/classify", guarded(_classify), methods=["POST"]),
        Route("/v1/embed", guarded(_embed), methods=["POST"]),
        Route("/v1/explain", guarded(_explain), methods=["POST"]),
        Route("/v1/search", guarded(_search), methods=["POST"]),
        Route("/v1/thumbnail", guarded(_thumbnail), methods=["GET"]),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error}
    )
    app.state.service = service
    app.add_middleware(HeaderLimit)
    app.add_middleware(_RecordMetrics, metrics=service.metrics, routes={r.path for r in routes})
    return app


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.Config options every `vitkit serve` server runs with: the guarded protocol
    (header deadline, 431) and its header size limit."""
    return {"http": "vitkit.serve.protocol:Protocol", "h11_max_incomplete_event_size":
            MAX_HEADER_BYTES}  # fmt: skip


def app_from_env():
    """App factory for uvicorn worker processes: `Settings` from $VITKIT_SERVE_SETTINGS.

    A worker whose model cannot be loaded would answer 503 forever (and a restarted one would
    fail again), so it leaves a mark at $VITKIT_SERVE_FAILED and stops the whole server with
    SIGTERM to its parent, which then exits 1 as a single-process server does."""

    def stop_server() -> None:
        marker = os.environ.get(ENV_FAILED)
        if marker:
            with open(marker, "a"):
                pass
        os.kill(os.getppid(), signal.SIGTERM)

    return create_app(settings_from_env(os.environ[ENV_SETTINGS]), on_fatal=stop_server)


def settings_to_env(settings: Settings) -> str:
    return json.dumps(asdict(settings))


def settings_from_env(text: str) -> Settings:
    """The inverse of `settings_to_env` (each --workers process reads its settings so)."""
    return Settings(**json.loads(text))


# ------------------------------------------------------------------------------ routes
async def _classify(request):
    """Classify one image.
    ---
    summary: Top-k classes of an image (the same probabilities as `vitkit predict --json`);
      with `labels`, zero-shot scores of those names (a CLIP or SigLIP model, as
      `vitkit predict --labels`)
    parameters:
      - {name: top_k, in: query, schema: {type: integer, default: 5, minimum: 1}}
      - {name: labels, in: query, description: 'class names (repeat the parameter; also as
         form fields)', schema: {type: array, items: {type: string}}, style: form, explode: true}
      - {name: template, in: query, description: 'prompt around each label, default
         "This is a photo of {}."', schema: {type: string}}
    requestBody:
      description: the image as the raw body, or as the multipart/form-data field `file`
      content: {"image/*": {}, "multipart/form-data": {}}
    responses:
      200: {description: '{"top_k": [{"label", "index", "probability"}], "model", "precision"}'}
      400: {description: 'not an image, corrupt, a decompression bomb, or a bad parameter
        (which label, which limit)'}
      401: {description: 'the server needs a token: Authorization: Bearer <token>'}
      408: {description: 'the body did not arrive within --body-timeout-s'}
      413: {description: 'body over --max-body-mb'}
      503: {description: 'the model is still loading, the queue is full (Retry-After), or the
        server is draining'}
      504: {description: 'still queued at --timeout-s: dropped before the model ran'}
    """
    service: Service = request.app.state.service
    top_k = _int_param(request, "top_k", 5, minimum=1)
    data, fields = await _read_request(request, service)
    labels = fields.get("labels", [])
    if labels:
        template = _one(fields, "template", DEFAULT_TEMPLATE)
        prompts = _prompts(service, labels, template)
        pixels = await _decode(service, _image_of(data))
        image = await batched(request, service.embed_batcher, pixels)
        texts = await in_model_thread(request, service.text_rows, prompts)
        probs, names = service.zero_shot(image, texts), dict(enumerate(labels))
        answered_by = service.embed_runner
    else:
        if not service.model.config.num_classes:
            hint = "send labels to classify zero-shot" if service.image_text is not None else (
                "use /v1/embed")  # fmt: skip
            fail(400, f"this model has no classification head (num_classes=0); {hint}")
        pixels = await _decode(service, _image_of(data))
        probs = await batched(request, service.batcher, pixels)
        names, answered_by = service.labels, None
    (rows,) = top_rows(probs[None].float().numpy(), min(top_k, probs.shape[0]), names)
    top = [{"label": label, "index": c, "probability": q} for c, label, q in rows]
    return _json({"top_k": top, **_model_fields(service, answered_by)})


async def _embed(request):
    """Embed one image, or one text.
    ---
    summary: The pooled representation the head reads ([CLS] or patch mean; CLIP's image
      embedding), or with `text` the text tower's embedding in the same space (CLIP, SigLIP)
    parameters:
      - {name: text, in: query, description: 'embed this text instead of an image (also a
         form field)', schema: {type: string}}
    requestBody:
      content: {"image/*": {}, "multipart/form-data": {}}
    responses:
      200: {description: '{"embedding": [floats], "dim": D, "model", "precision"}'}
      400: {description: 'not an image, a text too long, or no text tower'}
      413: {description: 'body too large'}
      503: {description: 'loading, queue full or draining'}
      504: {description: 'still queued at --timeout-s'}
    """
    service: Service = request.app.state.service
    data, fields = await _read_request(request, service)
    if "text" in fields:
        if data:
            fail(400, "send an image or a text, not both")
        text = _one(fields, "text", "")
        _check_text(service, text, "text")
        rows = await in_model_thread(request, service.text_rows, [text])
        row, runner = rows[0], None
    else:
        if service.embed_runner is None:
            fail(400, f"{service.settings.model} is an exported classifier: it outputs class "
                      "scores, not an embedding; serve the checkpoint, or an exported encoder")  # fmt: skip
        pixels = await _decode(service, _image_of(data))
        row = await batched(request, service.embed_batcher, pixels)
        runner = service.embed_runner
    fields = _model_fields(service, runner) if runner is not None else {
        "model": service.settings.model, "precision": _text_precision(service)}  # fmt: skip
    return _json({"embedding": row.tolist(), "dim": int(row.shape[0]), **fields})


async def _explain(request):
    """Explain one image.
    ---
    summary: A PNG heat map of the patches the decision rests on
    parameters:
      - {name: method, in: query, schema: {type: string, enum: [rollout, attention, grad-rollout], default: rollout}}
      - {name: label, in: query, description: 'class index or name (default: top-1)', schema: {type: string}}
      - {name: head_fusion, in: query, schema: {type: string, enum: [mean, max, min], default: mean}}
      - {name: discard_ratio, in: query, schema: {type: number, default: 0}}
    requestBody:
      content: {"image/*": {}, "multipart/form-data": {}}
    responses:
      200: {description: 'image/png; headers X-Vitkit-Label, X-Vitkit-Class-Index, X-Vitkit-Probability'}
      400: {description: 'not an image, or a bad parameter'}
      503: {description: 'loading, queue full or draining'}
      504: {description: 'still waiting for an explanation slot (--max-explain) or the model at
        --timeout-s'}
    """
    from starlette.responses import Response

    service: Service = request.app.state.service
    if is_exported(service.settings.model):
        fail(400, "explanations read the model's attention, which an exported file does not "
                  "give: serve the checkpoint to explain")  # fmt: skip
    q = request.query_params
    method = q.get("method", "rollout")
    if method not in METHODS:
        fail(400, f"method={method!r}; choose one of {list(METHODS)}")
    fusion = q.get("head_fusion", "mean")
    if fusion not in HEAD_FUSIONS:
        fail(400, f"head_fusion={fusion!r}; choose one of {list(HEAD_FUSIONS)}")
    ratio = _float_param(request, "discard_ratio", 0.0, minimum=0.0, below=1.0)
    try:
        label = label_index(q["label"], service.labels) if "label" in q else None
    except (ValueError, VitkitError) as exc:
        fail(400, str(exc))
    data = await _image_bytes(request, service)
    options = {"head_fusion": fusion, "discard_ratio": ratio}
    try:
        async with explain_slot(request, service):
            result, png = await in_model_thread(
                request, service.explain, data, method, label, options
            )
    except VitkitError as exc:  # ImageError, or a ConfigError from the parameters
        fail(400, _reason(exc))
    headers = {}
    if result.labels is not None:
        c = int(result.labels[0])
        headers = {
            "X-Vitkit-Label": _ascii(service.labels.get(c, str(c))),
            "X-Vitkit-Class-Index": str(c),
            "X-Vitkit-Probability": repr(float(result.probabilities[0, c])),
        }
    return Response(png, media_type="image/png", headers=headers)


async def _search(request):
    """Search the index (vitkit serve --index).
    ---
    summary: An image (multipart field `file`, or the raw body), or a `text` (query or form
      field; CLIP / SigLIP indexes) -> the k nearest indexed photos, best first
    parameters:
      - {name: k, in: query, schema: {type: integer, default: 12, maximum: 100}}
      - {name: text, in: query, schema: {type: string}}
    responses:
      200: {description: '{"results": [{"path", "score"}], "kind": "exact" | "hnsw", "images": N}'}
      400: {description: 'not an image, both or neither of image and text, a bad k, or text on
        an index without a text tower'}
      404: {description: 'the server has no index (--index)'}
      503: {description: 'loading, queue full or draining'}
      504: {description: 'still queued at --timeout-s'}
    """
    service: Service = request.app.state.service
    index = _index_of(service)
    k = _int_param(request, "k", 12, minimum=1)
    if k > MAX_SEARCH_K:
        fail(400, f"k must be at most {MAX_SEARCH_K}, got {k}")
    data, fields = await _read_request(request, service)
    text = _one(fields, "text", "") if "text" in fields else None
    if text is not None:
        if data:
            fail(400, "send an image or a text, not both")
        if not service._search_info()["text"]:
            fail(400, "this index has no text search: it needs a CLIP or SigLIP model with its "
                      "text tower and tokenizer, and rows of its own embedding (--pool model)")  # fmt: skip
        if not text.strip():
            fail(400, "give a non-empty text to search for")
        _check_text(service, text, "text")
        pixels = None
    else:
        pixels = await _decode(service, _image_of(data))
    results = await in_model_thread(request, service.search, pixels, text, k)
    return _json({"results": results, "kind": index.kind, "images": len(index)})


async def _thumbnail(request):
    """A thumbnail of an indexed photo (vitkit serve --index).
    ---
    summary: The JPEG thumbnail (at most 256 px a side) of `path`, which must be a path of the
      index (as /v1/search returns it) whose file is unchanged since it was indexed; no other
      file can be read through this route
    parameters:
      - {name: path, in: query, required: true, schema: {type: string}}
    responses:
      200: {description: 'image/jpeg'}
      404: {description: 'not a photo of the index, or the server has no index'}
      410: {description: 'the file changed or went away since it was indexed'}
    """
    from starlette.responses import Response

    service: Service = request.app.state.service
    index = _index_of(service)
    path = request.query_params.get("path", "")
    row = index.row(path) if path else None
    if row is None:
        fail(404, "not a photo of this server's index: give a path /v1/search returned")
    try:
        st = os.lstat(path)  # a link put in its place since is not followed
    except OSError:
        st = None
    size, mtime_ns = (int(v) for v in index.stats[row])
    if (
        st is None
        or not stat.S_ISREG(st.st_mode)
        or (st.st_size, st.st_mtime_ns) != (size, mtime_ns)
    ):
        fail(410, "this photo changed or went away since it was indexed; run vitkit index again")
    loop = asyncio.get_running_loop()
    try:
        jpeg = await loop.run_in_executor(service.decode_pool, service.thumbnail, path)
    except VitkitError as exc:
        fail(410, f"this photo cannot be read any more: {_reason(exc)}")
    return Response(
        jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"}
    )


def _index_of(service: Service) -> Any:
    if service.settings.index is None:
        fail(404, "this server has no index: start it with vitkit serve --index DIR")
    return service.index


def _probe(handler):
    """/healthz and /metrics: open, unless --auth-probes puts them behind the token too."""

    @functools.wraps(handler)
    async def endpoint(request):
        service: Service = request.app.state.service
        if service.settings.auth_probes:
            authorize(request, service)
        return await handler(request)

    return endpoint


async def _healthz(request):
    """Readiness.
    ---
    summary: 200 with model, precision, device and the answering process id (one per
      --workers process) once loaded and warmed; 503 before
    responses:
      200: {description: 'ready'}
      503: {description: 'loading, failed (with the error), or draining after SIGTERM'}
    """
    service: Service = request.app.state.service
    state = "draining" if service.draining else service.state
    body = {"status": "ok" if state == "ready" else state, **service.describe(),
            "pid": os.getpid(), "auth": service.settings.api_key is not None}  # fmt: skip
    if service.error:
        body["error"] = service.error
    return _json(body, 200 if state == "ready" else 503)


async def _metrics(request):
    """Prometheus metrics.
    ---
    summary: vitkit_requests_total, vitkit_request_seconds, vitkit_batch_size (text format)
    responses:
      200: {description: 'text/plain; version=0.0.4'}
    """
    from starlette.responses import Response

    return Response(request.app.state.service.metrics.render(), media_type=CONTENT_TYPE)


async def _page(request):
    """The web page.
    ---
    summary: Drop an image, see the top-k labels and the explanation
    responses:
      200: {description: 'text/html'}
    """
    from starlette.responses import HTMLResponse

    return HTMLResponse(_page_html())


async def _openapi(request):
    from starlette.schemas import SchemaGenerator

    generator = SchemaGenerator(
        {"openapi": "3.0.0", "info": {"title": "vitkit serve", "version": "1"}}  # the /v1 API
    )
    return _json(generator.get_schema(routes=request.app.routes))


# ------------------------------------------------------------------------------ helpers


async def _image_bytes(request, service: Service) -> bytes:
    """The image of a request: the multipart field `file`, else the raw body."""
    data, _ = await _read_request(request, service)
    return _image_of(data)


def _image_of(data: bytes) -> bytes:
    if not data:
        fail(400, "empty request: send the image as the body or as the multipart field 'file'")
    return data


async def _read_request(request, service: Service) -> tuple[bytes, dict[str, list[str]]]:
    """(image bytes, possibly empty; text fields) of a request: the multipart field `file`,
    else the raw body (`guarded` received it); the fields are the query's and a form's (multipart
    or urlencoded)."""
    body: bytes = request.state.body
    fields: dict[str, list[str]] = {}
    for key, value in request.query_params.multi_items():
        fields.setdefault(key, []).append(value)
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        body = await _multipart(request, service, body, fields)
    elif kind.startswith("application/x-www-form-urlencoded"):
        from urllib.parse import parse_qsl

        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True,
                              max_num_fields=_max_fields(service))  # fmt: skip
        except (UnicodeDecodeError, ValueError) as exc:
            fail(400, f"bad form body: {exc}")
        for key, value in pairs:
            fields.setdefault(key, []).append(value)
        body = b""
    return body, fields


def _max_fields(service: Service) -> int:
    """Form fields a request may have: --max-labels labels, a template and a text."""
    return service.settings.max_labels + 2


async def _multipart(request, service: Service, body: bytes, fields: dict[str, list[str]]) -> bytes:
    """The `file` of a multipart body (b"" without one); its text fields go into `fields`.
    Limits, each named in its 400: one file, `_max_fields` text fields, each at most
    4 x --max-text-chars bytes (UTF-8)."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body
        yield b""

    s = service.settings
    parser = MultiPartParser(request.headers, stream(), max_files=1,
                             max_fields=_max_fields(service),
                             max_part_size=4 * s.max_text_chars)  # fmt: skip
    parser.spool_max_size = s.max_body_bytes  # the body is in memory already: no temp files
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        reason = exc.message
        if reason.startswith("Too many fields"):
            reason = (f"more than {_max_fields(service)} text fields, the limit "
                      "(vitkit serve --max-labels, plus template and text)")  # fmt: skip
        elif reason.startswith("Too many files"):
            reason = "more than one file, the limit: send one image as 'file'"
        elif "exceeded maximum size" in reason:
            reason = (f"a text field over {4 * s.max_text_chars:,d} bytes, the limit "
                      "(4 x vitkit serve --max-text-chars)")  # fmt: skip
        fail(400, f"bad multipart body: {reason}")
    try:
        data = b""
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "file":
                    fail(400, f"multipart file field {key!r}: send the image as 'file'")
                data = await value.read()
            else:
                fields.setdefault(key, []).append(value)
        if not data and "labels" not in fields and "text" not in fields:
            fail(400, "multipart body has no file field named 'file'")
        return data
    finally:
        await form.close()


def _one(fields: dict[str, list[str]], name: str, default: str) -> str:
    values = fields.get(name, [default])
    if len(values) != 1:
        fail(400, f"{name} is given {len(values)} times; give it once")
    return values[0]


def _check_text(service: Service, text: str, what: str) -> None:
    if service.image_text is None:
        fail(400, f"this model has no text tower: {what} needs a CLIP or SigLIP checkpoint "
                   "with both towers and its tokenizer files")  # fmt: skip
    cap = service.settings.max_text_chars
    if len(text) > cap:
        fail(400, f"{what} has {len(text):,d} characters, over the limit of {cap:,d} "
                   "(vitkit serve --max-text-chars)")  # fmt: skip


def _prompts(service: Service, labels: list[str], template: str) -> list[str]:
    """The prompt of each label, or 400 naming the label or the limit at fault."""
    _check_text(service, template, "template")
    cap = service.settings.max_labels
    if len(labels) > cap:
        fail(400, f"{len(labels)} labels, over the limit of {cap} (vitkit serve --max-labels)")
    try:
        check_labels(labels, [template])
    except ConfigError as exc:
        fail(400, str(exc))
    prompts = [template.format(label) for label in labels]
    for label, prompt in zip(labels, prompts):
        _check_text(service, prompt, f"label {label[:40]!r}")
    return prompts


def _text_precision(service: Service) -> str:
    return "bf16" if service.text_tower.pos_embed.dtype == torch.bfloat16 else "fp32"


async def _decode(service: Service, data: bytes) -> Tensor:
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(service.decode_pool, service.preprocess, data)
    except VitkitError as exc:
        fail(400, _reason(exc))


def _int_param(request, name: str, default: int, *, minimum: int) -> int:
    return _param(request, name, default, int, "an integer", minimum, None)


def _float_param(request, name: str, default: float, *, minimum: float, below: float) -> float:
    return _param(request, name, default, float, "a number", minimum, below)


def _param(request, name: str, default: Any, kind: type, what: str, minimum: Any, below: Any):
    """A query parameter of type `kind` in [minimum, below) (no upper bound when None), or a
    400 naming it."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        fail(400, f"{name}={raw[:40]!r} is not {what}")
    if below is None and not minimum <= value:
        fail(400, f"{name} must be at least {minimum}, got {value}")
    if below is not None and not minimum <= value < below:  # also NaN and infinities
        fail(400, f"{name} must be in [{minimum:g}, {below:g}), got {raw[:40]}")
    return value


def _json(body: dict, status: int = 200):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status)


def _model_fields(service: Service, runner: Any = None) -> dict[str, str]:
    """The model and the precision that answered (the classify runner's unless `runner`)."""
    runner = runner if runner is not None else (service.runner or service.embed_runner)
    precision = runner.precision if runner is not None and runner.ready else "fp32"
    return {"model": service.settings.model, "precision": precision}


def _reason(exc: BaseException) -> str:
    """An error message without the '<bytes>: ' prefix image errors carry."""
    return str(exc).removeprefix("<bytes>: ") or type(exc).__name__


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


_PAGE: str | None = None


def _page_html() -> str:
    global _PAGE
    if _PAGE is None:
        _PAGE = resources.files("vitkit.serve").joinpath("page.html").read_text("utf-8")
    return _PAGE


class _RecordMetrics:
    """ASGI middleware: count every HTTP response by route and status, and time it."""

    def __init__(self, app, *, metrics: Metrics, routes: set[str]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope["path"] if scope["path"] in self.routes else "other"
            self.metrics.observe_request(route, status, time.perf_counter() - start)

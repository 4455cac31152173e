"""`vitkit serve --model SOURCE`: an HTTP server for one model (uvicorn + Starlette).

Routes, batching and metrics: `vitkit.serve.app`; deployment: docs/serving.md. SIGTERM stops
accepting connections, lets the requests in flight finish (at most DRAIN_SECONDS), then exits
0; Ctrl-C does the same and exits 130.
"""

from __future__ import annotations

import argparse

from vitkit.cli._args import add_image_size, add_model, add_precision, image_size

DRAIN_SECONDS = 8  # Kubernetes' terminationGracePeriodSeconds (deploy/) leaves room above this


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP (classify, embed, explain, web page)",
        description="Serve a model over HTTP: POST /v1/classify, /v1/embed, /v1/explain; GET "
        "/healthz, /metrics, /openapi.json and a web page at /. Concurrent requests are "
        "batched. Needs pip install 'vitkit[serve]'.",
    )
    add_model(p, presets=True, what="the server")
    add_image_size(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (8000)")
    add_precision(p, what="/v1/classify and /v1/embed")
    p.add_argument(
        "--calibration",
        metavar="DIR",
        help="images to calibrate static int8 / auto on (default: the first batch served)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--max-batch", type=int, default=8, help="images per forward pass at most (8)")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=20.0,
        help="how long the first request of a batch waits for company (20)",
    )
    p.add_argument("--max-body-mb", type=float, default=10.0, help="larger requests get 413 (10)")
    p.add_argument("--max-labels", type=int, default=100,
                   help="zero-shot labels per request (CLIP / SigLIP; 100); more get 400")  # fmt: skip
    p.add_argument("--max-text-chars", type=int, default=1000,
                   help="characters of one label prompt or text (1000); longer get 400")  # fmt: skip
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes, each with its own copy of the model (1)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads per process (torch's default)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    import signal
    import tempfile
    from pathlib import Path

    from vitkit.errors import VitkitError

    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise VitkitError(
            "serving needs uvicorn and starlette: pip install 'vitkit[serve]'"
        ) from None
    from vitkit.serve.app import ENV_FAILED, ENV_SETTINGS, Settings, create_app, settings_to_env

    if args.workers < 1:
        raise VitkitError(f"--workers must be at least 1, got {args.workers}")
    settings = Settings(
        model=args.model,
        precision=args.precision,
        backend=args.backend,
        cache=not args.no_cache,
        device=args.device,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_body_mb=args.max_body_mb,
        max_labels=args.max_labels,
        max_text_chars=args.max_text_chars,
        threads=args.threads,
        calibration=args.calibration,
        image_size=image_size(args),
    )
    common = dict(
        host=args.host,
        port=args.port,
        timeout_graceful_shutdown=DRAIN_SECONDS,
        log_level="info",
        # uvicorn's own h11 limit is far above --max-body-mb; the app streams and refuses
    )
    if args.workers > 1:  # each worker process builds the app from the environment
        with tempfile.TemporaryDirectory(prefix="vitkit-serve-") as tmp:
            failed = Path(tmp) / "failed"  # a worker that cannot load the model creates it
            os.environ[ENV_SETTINGS] = settings_to_env(settings)
            os.environ[ENV_FAILED] = str(failed)
            uvicorn.run(
                "vitkit.serve.app:app_from_env", factory=True, workers=args.workers, **common
            )
            return 1 if failed.exists() else 0
    server: uvicorn.Server | None = None

    def stop() -> None:  # the model could not be loaded: shut down, exit 1
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=stop)
    server = uvicorn.Server(uvicorn.Config(app, **common))
    # uvicorn drains on SIGTERM, then raises the signal again once its handler is gone; a no-op
    # handler underneath turns that into a normal return, so a drained server exits 0
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 1 if app.state.service.state == "failed" else 0

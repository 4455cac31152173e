"""`vitkit serve --model SOURCE`: an HTTP server for one model (uvicorn + Starlette).

Routes, batching and metrics: `vitkit.serve.app`; deployment: docs/serving.md. SIGTERM drains:
new requests get 503 while the admitted ones finish (at most DRAIN_SECONDS), then the server
exits 0; Ctrl-C stops accepting connections, lets the requests in flight finish and exits 130.
A server bound to an address other than loopback needs an access token (--api-key-file or
$VITKIT_API_KEY) unless --no-auth says otherwise.
"""

from __future__ import annotations

import argparse

from vitkit.cli._args import add_image_size, add_model, add_precision, image_size

DRAIN_SECONDS = 8  # Kubernetes' terminationGracePeriodSeconds (deploy/) leaves room above this
ENV_API_KEY = "VITKIT_API_KEY"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP (classify, embed, explain, search, web page)",
        description="Serve a model over HTTP: POST /v1/classify, /v1/embed, /v1/explain (and "
        "/v1/search with --index); GET "
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
    p.add_argument("--index", metavar="DIR",
                   help="a `vitkit index` folder built with this model: adds POST /v1/search "
                        "(an image or a text) and GET /v1/thumbnail of its photos, and a search "
                        "box on the page")  # fmt: skip
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
    g = p.add_argument_group("overload and slow clients")
    g.add_argument("--max-queue", type=int, default=None, metavar="N",
                   help="/v1 requests admitted at once per process; more get 503 with "
                   "Retry-After at once (default: 8 x --max-batch)")  # fmt: skip
    g.add_argument("--timeout-s", type=float, default=30.0, metavar="S",
                   help="a request still queued S seconds after its body arrived is dropped "
                   "before the model and gets 504 (30)")  # fmt: skip
    g.add_argument("--max-explain", type=int, default=1, metavar="N",
                   help="explanations running at once; more wait, so classification keeps "
                   "its share of the model (1)")  # fmt: skip
    g.add_argument("--header-timeout-s", type=float, default=10.0, metavar="S",
                   help="request line and headers must arrive within S seconds, else 408 and "
                   "the connection closes (10)")  # fmt: skip
    g.add_argument(
        "--body-timeout-s",
        type=float,
        default=30.0,
        metavar="S",
        help="the body must arrive within S seconds of the headers, else 408 (30)",
    )
    g = p.add_argument_group("access")
    g.add_argument("--api-key-file", metavar="FILE",
                   help=f"require 'Authorization: Bearer <token>' on /v1/* with the token in "
                   f"FILE (default: ${ENV_API_KEY} if set); /healthz and /metrics stay open "
                   "unless --auth-probes")  # fmt: skip
    g.add_argument("--auth-probes", action="store_true",
                   help="also require the token on /healthz and /metrics (probes then send "
                   "the header: Kubernetes' httpGet.httpHeaders)")  # fmt: skip
    g.add_argument("--no-auth", action="store_true",
                   help="serve without a token on an address other than loopback (refused "
                   "otherwise)")  # fmt: skip
    g.add_argument("--ssl-certfile", metavar="PEM", help="serve HTTPS with this certificate")
    g.add_argument(
        "--ssl-keyfile", metavar="PEM", help="its private key (if not in --ssl-certfile)"
    )
    p.set_defaults(func=run)


def _api_key(args: argparse.Namespace) -> str | None:
    """The token from --api-key-file, else $VITKIT_API_KEY, else None; refuses a non-loopback
    --host without one unless --no-auth (then warns)."""
    import ipaddress
    import os
    import sys

    from vitkit.errors import VitkitError

    key = None
    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                key = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise VitkitError(f"--api-key-file {args.api_key_file}: {exc}") from None
        if not key:
            raise VitkitError(f"--api-key-file {args.api_key_file} is empty")
    elif os.environ.get(ENV_API_KEY, "").strip():
        key = os.environ[ENV_API_KEY].strip()
    if key is not None and args.no_auth:
        raise VitkitError(
            f"--no-auth contradicts the token given (--api-key-file or ${ENV_API_KEY})"
        )
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        loopback = False
    if key is None and not loopback:
        if not args.no_auth:
            raise VitkitError(
                f"--host {args.host} lets other machines in: give a token with --api-key-file "
                f"FILE (or ${ENV_API_KEY}), or say --no-auth to serve without one"
            )
        print(f"vitkit serve: warning: --no-auth: anyone who reaches {args.host}:{args.port} "
              "can use the model", file=sys.stderr, flush=True)  # fmt: skip
    return key


def _index(folder: str | None) -> str | None:
    """--index as an absolute path, once its manifest and files check out (one line if not;
    whether its rows came from this model is checked when the model has loaded)."""
    if folder is None:
        return None
    import os

    from vitkit.search import open_index

    open_index(folder, verify=False)
    return os.path.abspath(folder)


def _check_tls(args: argparse.Namespace) -> None:
    """Load the certificate once here, so a bad file is one line, not uvicorn's traceback."""
    import ssl

    from vitkit.errors import VitkitError

    if args.ssl_keyfile and not args.ssl_certfile:
        raise VitkitError("--ssl-keyfile needs --ssl-certfile")
    if args.ssl_certfile:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                args.ssl_certfile, args.ssl_keyfile
            )
        except (OSError, ssl.SSLError) as exc:
            raise VitkitError(f"--ssl-certfile/--ssl-keyfile: {exc}") from None


def run(args: argparse.Namespace) -> int:
    import os
    import signal
    import sys
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
    from vitkit.serve.app import (
        ENV_FAILED,
        ENV_SETTINGS,
        Settings,
        create_app,
        server_options,
        settings_to_env,
    )

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
        max_queue=args.max_queue,
        timeout_s=args.timeout_s,
        max_explain=args.max_explain,
        header_timeout_s=args.header_timeout_s,
        body_timeout_s=args.body_timeout_s,
        drain_s=DRAIN_SECONDS,
        api_key=_api_key(args),
        index=_index(args.index),
        auth_probes=args.auth_probes,
    )
    _check_tls(args)
    common = dict(
        host=args.host,
        port=args.port,
        timeout_graceful_shutdown=DRAIN_SECONDS,
        log_level="info",
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        **server_options(settings),
        # uvicorn's own h11 limit is far above --max-body-mb; the app streams and refuses
    )
    print(
        f"vitkit serve: at most {settings.queue_limit} requests queued per process (--max-queue), "
        f"{settings.timeout_s:g} s deadline (--timeout-s), {settings.max_explain} explanation(s) "
        f"at a time (--max-explain); access token "
        f"{'required on /v1' if settings.api_key else 'off'}",
        file=sys.stderr,
        flush=True,
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

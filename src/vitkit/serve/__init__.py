"""`vitkit serve`: one model over HTTP with dynamic batching, metrics and a web page.

    from vitkit.serve.app import Settings, create_app
    app = create_app(Settings(model="out/"))   # any ASGI server runs it; `vitkit serve` uses uvicorn

Needs the `serve` extra: pip install 'vitkit[serve]'.
"""

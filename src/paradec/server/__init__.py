"""`paradec serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of one engine.

    app.py       the routes, admission (cheap checks first) and the graceful drain
    requests.py  from an HTTP request to an engine call: API key, body (size, deadline, schema), values, `prepare`
    formats.py   OpenAI's response and chunk shapes; the SSE stream
    errors.py    APIError (OpenAI's error shape), request ids, the 500 that names only the id
    schemas.py   pydantic request/response models
    worker.py    the scheduler seam (Job -> Handle of events) and the one-at-a-time engine worker
    batching.py  the batched scheduler: continuous batching through one `paradec.batch.BatchDecoder`
    metrics.py   the server's Prometheus registry
    runtime.py   under uvicorn: header deadline and connection cap per connection; drain on SIGTERM/SIGINT, exit 0
    cli.py       the `paradec serve` sub-command

FastAPI, uvicorn and prometheus-client are the optional `serve` extra: nothing here is imported by `import paradec`,
and `paradec.server.cli` imports them only when the server starts.
"""

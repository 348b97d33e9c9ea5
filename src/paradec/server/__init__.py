"""`paradec serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of one engine.

    app.py      endpoints, request checks, OpenAI-shaped responses, errors and SSE streams
    schemas.py  pydantic request/response models
    worker.py   the scheduler seam (Job -> Handle of events) and the one-at-a-time engine worker
    metrics.py  the server's Prometheus registry
    cli.py      the `paradec serve` sub-command

FastAPI, uvicorn and prometheus-client are the optional `serve` extra: nothing here is imported by `import paradec`,
and `paradec.server.cli` imports them only when the server starts.
"""

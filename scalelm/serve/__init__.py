"""``scalelm serve``: an OpenAI-compatible HTTP server for one model directory.

engine.py   the continuous-batching decode loop (one thread owns the model and the batch)
schemas.py  request bodies (pydantic), as the OpenAI API defines them, plus vLLM's extras
server.py   requests to sequences and back: limits, prompts, sampling settings, OpenAI's shapes
gate.py     middleware in front of every route (API key, body limit, request metrics); errors
app.py      the FastAPI app: routes, streaming (server-sent events), error handlers
metrics.py  Prometheus metrics (prometheus-client)
cli.py      the command: ``scalelm serve MODEL [--port 8000] [--api-key KEY] ...``
"""

"""``scalelm serve``: an OpenAI-compatible HTTP server for one model directory.

engine.py   the continuous-batching decode loop (one thread owns the model and the batch)
prefill.py  a prompt on its way into a batch row: prefilled whole or in chunks between decode steps
prefix_cache.py  keys/values of shared prompt prefixes, by chained block hash, LRU under a byte budget
schemas.py  request bodies (pydantic), as the OpenAI API defines them, plus vLLM's extras
server.py   requests to sequences and back: limits, prompts, sampling settings, OpenAI's shapes
gate.py     middleware in front of every route (API key, body limit, request metrics); errors
app.py      the FastAPI app: routes, streaming (server-sent events), error handlers
metrics.py  Prometheus metrics (prometheus-client)
cli.py      the command: ``scalelm serve MODEL [--port 8000] [--api-key KEY] ...``
"""

# The engine's defaults, here so that `scalelm serve --help` shows them without importing torch.
MAX_BATCH = 16  # rows decoded together (serve --batch-size): docs/serving.md says why 16
PREFIX_CACHE_MB = 256  # the prefix cache's budget (serve --prefix-cache-mb; 0: off)
PREFILL_CHUNK = 256  # prompt tokens prefilled per step while rows decode (serve --prefill-chunk; 0: whole prompts)

"""Throughput and latency of ``scalelm serve`` under 1, 4 and 16 concurrent clients.

    python benchmarks/bench_serve.py                 # 6L-384 (GPT-2 vocabulary), writes results/serve.json
    python benchmarks/bench_serve.py --quick         # a tiny model, few requests: a smoke run (serve_quick.json)

The server runs as a real ``scalelm serve`` subprocess on 127.0.0.1 (random weights, token-id
prompts, so no tokenizer is needed), once with ``--batch-size 1`` (requests decode one after the
other) and once with ``--batch-size`` = the largest concurrency (continuous batching). Each client
thread sends ``--requests`` streaming completions one after another: a ``--prompt-len`` token
prompt, ``--max-tokens`` greedy tokens, end of text ignored, ``logprobs=0`` (without a tokenizer
there is no text to stream; this sends a chunk per token, so the first one can be timed). Reported per setting: generated
tokens/s over the wall time of the whole load, request latency (median, p90), time to first
token (median) and the mean rows per decode step (from the server's /metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics as st
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {
    "6L-384": dict(vocab_size=50257, block_size=256, n_layer=6, n_head=6, n_embd=384),
    "tiny": dict(vocab_size=1000, block_size=128, n_layer=2, n_head=4, n_embd=128),
}


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def make_model_dir(name: str, out: Path) -> Path:
    import torch

    from scalelm.config import ModelConfig
    from scalelm.model import GPT
    from scalelm.model.io import save_model_dir

    torch.manual_seed(0)
    save_model_dir(GPT(ModelConfig(**MODELS[name])), out)
    return out


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class ServerProcess:
    def __init__(self, model_dir: Path, max_batch: int, threads: int, max_queue: int = 1024):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.p = subprocess.Popen([sys.executable, "-m", "scalelm", "serve", str(model_dir), "--port", str(self.port),
                                   "--batch-size", str(max_batch), "--max-queue", str(max_queue), "--threads", str(threads),
                                   "--served-model-name", "bench", "--log-level", "warning"],
                                  env=env, cwd=ROOT, stderr=subprocess.DEVNULL)

    def __enter__(self):
        import httpx

        deadline = time.time() + 120
        while time.time() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError("the server exited")
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("the server did not start")

    def __exit__(self, *exc):
        self.p.terminate()
        self.p.wait(30)

    def metric(self, name: str) -> float:
        import httpx

        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0


def one_request(client, url: str, prompt: list[int], max_tokens: int) -> dict:
    # logprobs=0: a chunk per token even without a tokenizer (no text to stream), so TTFT is measurable
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "logprobs": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens = None, 0
    with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    return dict(latency=end - t0, ttft=(first or end) - t0, tokens=tokens)


def run_load(srv: ServerProcess, clients: int, requests: int, prompt_len: int, max_tokens: int, vocab: int) -> dict:
    import random

    import httpx

    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(clients * requests)]
    results: list[dict] = []
    lock = threading.Lock()

    def client(k: int):
        with httpx.Client(timeout=600) as c:
            for j in range(requests):
                r = one_request(c, srv.url, prompts[k * requests + j], max_tokens)
                with lock:
                    results.append(r)

    steps0, rows0 = srv.metric("scalelm_decode_batch_rows_count"), srv.metric("scalelm_decode_batch_rows_sum")
    t = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    steps = srv.metric("scalelm_decode_batch_rows_count") - steps0
    rows = srv.metric("scalelm_decode_batch_rows_sum") - rows0
    lat = sorted(r["latency"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return dict(clients=clients, requests=len(results), tokens=tokens, wall_s=round(wall, 3),
                tokens_per_s=round(tokens / wall, 1), latency_p50_s=round(st.median(lat), 3),
                latency_p90_s=round(lat[min(len(lat) - 1, int(0.9 * len(lat)))], 3),
                ttft_p50_ms=round(1e3 * st.median(r["ttft"] for r in results), 1),
                mean_rows_per_step=round(rows / steps, 2) if steps else None)


def table(rows: list[dict]) -> str:
    head = ("| max batch | clients | requests | tokens/s | latency p50 s | latency p90 s | TTFT p50 ms | rows/step |"
            " speed-up vs max batch 1 |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = {r["clients"]: r["tokens_per_s"] for r in rows if r["max_batch"] == 1}
    lines = [head]
    for r in rows:
        sp = r["tokens_per_s"] / base[r["clients"]] if base.get(r["clients"]) else float("nan")
        lines.append(f"| {r['max_batch']} | {r['clients']} | {r['requests']} | {r['tokens_per_s']} | "
                     f"{r['latency_p50_s']} | {r['latency_p90_s']} | {r['ttft_p50_ms']} | "
                     f"{r['mean_rows_per_step']} | {sp:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 request per client, 16 tokens")
    ap.add_argument("--model", choices=list(MODELS), default=None)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=None, help="requests per client (default 4; quick 1)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=None, help="default 64; quick 16")
    ap.add_argument("--threads", type=int, default=1, help="the server's CPU threads")
    ap.add_argument("--out", default=None, help="results file name in benchmarks/results")
    args = ap.parse_args()
    model = args.model or ("tiny" if args.quick else "6L-384")
    requests = args.requests or (1 if args.quick else 4)
    max_tokens = args.max_tokens or (16 if args.quick else 64)
    conc = [int(x) for x in args.concurrency.split(",")]
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(model, Path(tmp) / model)
        for max_batch in (1, max(conc)):
            with ServerProcess(model_dir, max_batch, args.threads) as srv:
                run_load(srv, 1, 1, args.prompt_len, 4, MODELS[model]["vocab_size"])  # warm-up
                for c in conc:
                    r = run_load(srv, c, requests, args.prompt_len, max_tokens, MODELS[model]["vocab_size"])
                    r["max_batch"] = max_batch
                    rows.append(r)
                    log(f"max batch {max_batch:>3}, {c:>3} clients: {r['tokens_per_s']} tok/s, "
                        f"latency p50 {r['latency_p50_s']} s, {r['mean_rows_per_step']} rows/step")
    print(table(rows))
    out = dict(model=model, config=MODELS[model], prompt_len=args.prompt_len, max_tokens=max_tokens,
               requests_per_client=requests, server_threads=args.threads, quick=args.quick,
               cores=os.cpu_count(), torch=torch.__version__, load_avg_1m=os.getloadavg()[0], rows=rows)
    from scalelm.fileio import atomic_write_text

    path = ROOT / "benchmarks" / "results" / (args.out or ("serve_quick.json" if args.quick else "serve.json"))
    atomic_write_text(path, json.dumps(out, indent=2) + "\n")
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

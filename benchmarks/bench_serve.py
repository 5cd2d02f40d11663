"""Throughput and latency of ``scalelm serve`` at 1, 4, 16 and 64 clients; prefix caching; chunked prefill.

    python benchmarks/bench_serve.py                 # 6L-384 (GPT-2 vocabulary), writes results/serve.json
    python benchmarks/bench_serve.py --quick         # a tiny model, few requests: a smoke run (serve_quick.json)
    python benchmarks/bench_serve.py --report prefix # TTFT of requests sharing a 1,000-token prefix, cache on/off
    python benchmarks/bench_serve.py --report chunk  # ITL of running streams while a 2,000-token prompt arrives

The server runs as a real ``scalelm serve`` subprocess on 127.0.0.1 (random weights, token-id
prompts, so no tokenizer is needed), once with ``--batch-size 1`` (requests decode one after the
other) and once with ``--batch-size`` = the largest concurrency (continuous batching). Each client
thread sends ``--requests`` streaming completions one after another: a ``--prompt-len`` token
prompt, ``--max-tokens`` greedy tokens, end of text ignored, ``logprobs=0`` (without a tokenizer
there is no text to stream; this sends a chunk per token, so the first one can be timed). Reported per setting: generated
tokens/s over the wall time of the whole load, request latency (median, p90), time to first
token and inter-token latency (p50, p99: the gaps between a stream's token chunks) and the mean
rows per decode step (from the server's /metrics), and the tokens/s against ``--batch-size 1``.

``--report prefix`` (model 6L-384-2k: the same with a 2,304-token context) sends, from one client,
a warm-up request and then ``--requests`` requests whose prompts share a ``--prefix-len`` (1,000)
token prefix and differ after it (24 tokens), each for 8 tokens, to a server with the prefix cache
(``--prefix-cache-mb``'s default) and one without (``--prefix-cache-mb 0``): TTFT p50/p99 of each.

``--report chunk`` (6L-384-2k) runs ``--running`` streams (4) of 200 tokens; once they are decoding,
one ``--long-len`` (2,000) token prompt arrives. Reported, with ``--prefill-chunk``'s default and
with ``--prefill-chunk 0`` (whole prompts): the p50/p99/max of the running streams' inter-token
gaps that overlap the long prompt's wait (sent to its first token), and the long prompt's TTFT.
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
    "6L-384-2k": dict(vocab_size=50257, block_size=2304, n_layer=6, n_head=6, n_embd=384),
    "tiny": dict(vocab_size=1000, block_size=128, n_layer=2, n_head=4, n_embd=128),
    "tiny-2k": dict(vocab_size=1000, block_size=2304, n_layer=2, n_head=4, n_embd=128),
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
    def __init__(self, model_dir: Path, max_batch: int, threads: int, max_queue: int = 1024, extra: tuple = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.p = subprocess.Popen([sys.executable, "-m", "scalelm", "serve", str(model_dir), "--port", str(self.port),
                                   "--batch-size", str(max_batch), "--max-queue", str(max_queue), "--threads", str(threads),
                                   "--served-model-name", "bench", "--log-level", "warning", *extra],
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
    times, tokens = [], 0  # arrival time of each token chunk
    with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            else:
                times.append(time.perf_counter())
    end = time.perf_counter()
    return dict(start=t0, latency=end - t0, ttft=(times[0] if times else end) - t0, tokens=tokens, times=times)


def pct(xs: list, q: float) -> float:
    """The q-quantile (0..1) of xs, nearest rank; NaN if empty."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * len(xs) + 0.5) - 1))] if xs else float("nan")


def gaps(r: dict) -> list[tuple[float, float]]:
    """(start, end) of each gap between a stream's successive token chunks."""
    return list(zip(r["times"], r["times"][1:]))


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
    ttft = [r["ttft"] for r in results]
    itl = [b - a for r in results for a, b in gaps(r)]
    return dict(clients=clients, requests=len(results), tokens=tokens, wall_s=round(wall, 3),
                tokens_per_s=round(tokens / wall, 1), latency_p50_s=round(st.median(lat), 3),
                latency_p90_s=round(lat[min(len(lat) - 1, int(0.9 * len(lat)))], 3),
                ttft_p50_ms=round(1e3 * pct(ttft, 0.5), 1), ttft_p99_ms=round(1e3 * pct(ttft, 0.99), 1),
                itl_p50_ms=round(1e3 * pct(itl, 0.5), 1), itl_p99_ms=round(1e3 * pct(itl, 0.99), 1),
                mean_rows_per_step=round(rows / steps, 2) if steps else None)


def table(rows: list[dict]) -> str:
    head = ("| max batch | clients | requests | tokens/s | vs one at a time | TTFT p50 ms | TTFT p99 ms | ITL p50 ms |"
            " ITL p99 ms | latency p50 s | rows/step |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = {r["clients"]: r["tokens_per_s"] for r in rows if r["max_batch"] == 1}
    lines = [head]
    for r in rows:
        sp = r["tokens_per_s"] / base[r["clients"]] if base.get(r["clients"]) else float("nan")
        lines.append(f"| {r['max_batch']} | {r['clients']} | {r['requests']} | {r['tokens_per_s']} | {sp:.2f}x | "
                     f"{r['ttft_p50_ms']} | {r['ttft_p99_ms']} | {r['itl_p50_ms']} | {r['itl_p99_ms']} | "
                     f"{r['latency_p50_s']} | {r['mean_rows_per_step']} |")
    return "\n".join(lines)


def prefix_report(model_dir: Path, args, vocab: int) -> list[dict]:
    """TTFT of requests sharing a --prefix-len token prefix, with the prefix cache and without."""
    import random

    import httpx

    rng = random.Random(0)
    prefix = [rng.randrange(vocab) for _ in range(args.prefix_len)]
    prompts = [prefix + [rng.randrange(vocab) for _ in range(24)] for _ in range(args.requests + 1)]
    rows = []
    for label, extra in (("on", ()), ("off", ("--prefix-cache-mb", "0"))):
        with ServerProcess(model_dir, args.batch_size, args.threads, extra=extra) as srv, \
                httpx.Client(timeout=600) as c:
            one_request(c, srv.url, prompts[0], 8)  # warm-up; with the cache on, it fills the cache
            ttft = [one_request(c, srv.url, p, 8)["ttft"] for p in prompts[1:]]
            hits = srv.metric("scalelm_prefix_cache_hit_tokens_total")
        rows.append(dict(cache=label, prefix_len=args.prefix_len, requests=len(ttft),
                         ttft_p50_ms=round(1e3 * pct(ttft, 0.5), 1), ttft_p99_ms=round(1e3 * pct(ttft, 0.99), 1),
                         cached_tokens=int(hits)))
        log(f"prefix cache {label}: TTFT p50 {rows[-1]['ttft_p50_ms']} ms, p99 {rows[-1]['ttft_p99_ms']} ms")
    return rows


def chunk_report(model_dir: Path, args, vocab: int) -> list[dict]:
    """Inter-token gaps of --running streams while one --long-len token prompt arrives, chunked and not."""
    import random

    import httpx

    rng = random.Random(0)
    long_prompt = [rng.randrange(vocab) for _ in range(args.long_len)]
    rows = []
    for label, extra in (("chunked", ()), ("whole", ("--prefill-chunk", "0"))):
        with ServerProcess(model_dir, args.batch_size, args.threads, extra=extra) as srv:
            running: list[dict] = []

            def stream():
                with httpx.Client(timeout=600) as c:
                    running.append(one_request(c, srv.url, [rng.randrange(vocab) for _ in range(32)],
                                               args.running_tokens))

            threads = [threading.Thread(target=stream) for _ in range(args.running)]
            for th in threads:
                th.start()
            deadline = time.time() + 60
            while srv.metric("scalelm_generation_tokens_total") < 8 * args.running and time.time() < deadline:
                time.sleep(0.02)  # the running streams are decoding
            with httpx.Client(timeout=600) as c:
                long = one_request(c, srv.url, long_prompt, 1)
            for th in threads:
                th.join()
        t0, t1 = long["start"], long["start"] + long["ttft"]
        during = [b - a for r in running for a, b in gaps(r) if b > t0 and a < t1]  # gaps overlapping the wait
        if not during:
            log(f"prefill {label}: no running stream was decoding while the long prompt waited: raise --running-tokens")
        rows.append(dict(prefill=label, long_len=args.long_len, running=args.running, gaps=len(during),
                         itl_p50_ms=round(1e3 * pct(during, 0.5), 1), itl_p99_ms=round(1e3 * pct(during, 0.99), 1),
                         itl_max_ms=round(1e3 * max(during, default=float("nan")), 1),
                         long_ttft_ms=round(1e3 * long["ttft"], 1)))
        log(f"prefill {label}: ITL during the long prefill p99 {rows[-1]['itl_p99_ms']} ms, "
            f"long TTFT {rows[-1]['long_ttft_ms']} ms")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 request per client, 16 tokens")
    ap.add_argument("--report", choices=["throughput", "prefix", "chunk"], default="throughput",
                    help="throughput: tokens/s, TTFT, ITL per concurrency (default); prefix: TTFT with and without the "
                         "prefix cache; chunk: ITL of running streams while a long prompt arrives, chunked or not")
    ap.add_argument("--model", choices=list(MODELS), default=None)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=None, help="requests per client (default 4; quick 1; prefix 8)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=None, help="default 64; quick 16")
    ap.add_argument("--threads", type=int, default=1, help="the server's CPU threads")
    ap.add_argument("--batch-size", type=int, default=16, help="the server's --batch-size in the prefix and chunk "
                    "reports (default 16)")
    ap.add_argument("--prefix-len", type=int, default=1000, help="prefix report: shared prefix tokens (default 1000)")
    ap.add_argument("--long-len", type=int, default=2000, help="chunk report: the long prompt's tokens (default 2000)")
    ap.add_argument("--running", type=int, default=4, help="chunk report: running streams (default 4)")
    ap.add_argument("--running-tokens", type=int, default=200, help="chunk report: their tokens (default 200)")
    ap.add_argument("--out", default=None, help="results file name in benchmarks/results")
    args = ap.parse_args()
    long_ctx = args.report != "throughput"
    model = args.model or (("tiny" if args.quick else "6L-384") + ("-2k" if long_ctx else ""))
    requests = args.requests or (1 if args.quick else 8 if args.report == "prefix" else 4)
    max_tokens = args.max_tokens or (16 if args.quick else 64)
    conc = [int(x) for x in args.concurrency.split(",")]
    import torch

    vocab = MODELS[model]["vocab_size"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(model, Path(tmp) / model)
        if args.report == "prefix":
            args.requests = requests
            rows = prefix_report(model_dir, args, vocab)
        elif args.report == "chunk":
            rows = chunk_report(model_dir, args, vocab)
        else:
            for max_batch in (1, max(conc)):
                with ServerProcess(model_dir, max_batch, args.threads) as srv:
                    run_load(srv, 1, 1, args.prompt_len, 4, vocab)  # warm-up
                    for c in conc:
                        r = run_load(srv, c, requests, args.prompt_len, max_tokens, vocab)
                        r["max_batch"] = max_batch
                        rows.append(r)
                        log(f"max batch {max_batch:>3}, {c:>3} clients: {r['tokens_per_s']} tok/s, TTFT p50 "
                            f"{r['ttft_p50_ms']} ms, ITL p99 {r['itl_p99_ms']} ms, {r['mean_rows_per_step']} rows/step")
            print(table(rows))
    if args.report != "throughput":
        print("\n".join(json.dumps(r) for r in rows))
    out = dict(report=args.report, model=model, config=MODELS[model], prompt_len=args.prompt_len, max_tokens=max_tokens,
               requests_per_client=requests, server_threads=args.threads, quick=args.quick,
               cores=os.cpu_count(), torch=torch.__version__, load_avg_1m=os.getloadavg()[0], rows=rows)
    from scalelm.fileio import atomic_write_text

    suffix = "" if args.report == "throughput" else f"_{args.report}"
    path = ROOT / "benchmarks" / "results" / (args.out or f"serve{suffix}{'_quick' if args.quick else ''}.json")
    atomic_write_text(path, json.dumps(out, indent=2) + "\n")
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

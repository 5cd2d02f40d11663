"""Soak test of ``scalelm serve``: many requests past the queue bound, the server's memory over time.

    python benchmarks/bench_serve_soak.py [--requests 2000] [--clients 32] [--max-queue 8]   # overflow: 429s
    python benchmarks/bench_serve_soak.py --clients 16 --max-queue 16 --out serve_soak_served.json  # all served

A real ``scalelm serve`` subprocess (random-weight 2-layer model, token-id prompts) gets
``--requests`` short completions from ``--clients`` threads with a small queue, so part of them
must be answered 429. Reported: how many got 200, 429 and anything else (nothing else is the
goal), whether any request hung (an httpx timeout), and the server's RSS after every fifth of
the requests (flat is the goal). Writes ``benchmarks/results/serve_soak.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import ROOT, ServerProcess, make_model_dir  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--out", default="serve_soak.json", help="results file name in benchmarks/results")
    args = ap.parse_args()

    import httpx
    import psutil

    with tempfile.TemporaryDirectory() as tmp:
        model = make_model_dir("tiny", Path(tmp) / "m")
        with ServerProcess(model, max_batch=8, threads=1, max_queue=args.max_queue) as srv:
            proc = psutil.Process(srv.p.pid)
            codes: dict[str, int] = {}
            rss, done, lock = [], [0], threading.Lock()
            rng = random.Random(0)
            prompts = [[rng.randrange(1000) for _ in range(16)] for _ in range(args.requests)]
            todo = list(range(args.requests))
            rss.append((0, proc.memory_info().rss / 2**20))
            t0 = time.perf_counter()

            def client():
                with httpx.Client(timeout=120) as c:
                    while True:
                        with lock:
                            if not todo:
                                return
                            i = todo.pop()
                        try:
                            r = c.post(srv.url + "/v1/completions", json={
                                "model": "bench", "prompt": prompts[i], "max_tokens": args.max_tokens,
                                "temperature": 0, "ignore_eos": True})
                            key = str(r.status_code)
                        except httpx.TimeoutException:
                            key = "timeout"
                        except httpx.HTTPError as e:
                            key = type(e).__name__
                        with lock:
                            codes[key] = codes.get(key, 0) + 1
                            done[0] += 1
                            if done[0] % (args.requests // 5) == 0:
                                rss.append((done[0], proc.memory_info().rss / 2**20))

            threads = [threading.Thread(target=client) for _ in range(args.clients)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall = time.perf_counter() - t0
            alive = srv.p.poll() is None
    res = {"requests": args.requests, "clients": args.clients, "max_queue": args.max_queue, "codes": codes,
           "wall_s": round(wall, 1), "server_alive": alive,
           "rss_mb": [[n, round(m, 1)] for n, m in rss],
           "rss_growth_mb_after_first_fifth": round(rss[-1][1] - rss[1][1], 1) if len(rss) > 2 else None}
    print("| after requests | server RSS MiB |\n|---:|---:|")
    for n, m in rss:
        print(f"| {n} | {m:.1f} |")
    print(f"status codes: {codes}; wall {wall:.1f} s; server alive: {alive}")
    out = ROOT / "benchmarks" / "results" / args.out
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

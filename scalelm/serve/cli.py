"""``scalelm serve MODEL_DIR``: the OpenAI-compatible server on uvicorn.

    scalelm serve runs/baby                                  # http://127.0.0.1:8000/v1
    scalelm serve runs/baby --port 9000 --max-batch 16 --served-model-name baby
    SCALELM_API_KEY=secret scalelm serve runs/baby --host 0.0.0.0   # reachable from the network: use a key
"""

from __future__ import annotations

import ipaddress
import os
import sys

from ..errors import UserError

API_KEY_ENV = "SCALELM_API_KEY"


def add_serve_parser(p) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="model directory, or a RUN_DIR (its latest checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 = every interface, then set an API key)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--api-key", default=None, help=f"require `Authorization: Bearer KEY` on every route but "
                   f"/health (default: ${API_KEY_ENV}, which keeps the key out of `ps`; unset = no key)")
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="sequences waiting for a row before requests "
                   "get 429 (default 64)")
    p.add_argument("--served-model-name", metavar="NAME", help="the model's name in the API "
                   "(default: MODEL_DIR as given)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = bfloat16 on a GPU that has it, else float32")
    p.add_argument("--threads", type=int, help="CPU threads for the model (default: torch's)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_serve(args) -> int:
    import torch

    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"scalelm serve needs the [serve] extra ({e.name} is missing): "
                        "pip install 'scalelm[serve]'") from None
    from ..generate.generator import Generator
    from ..runs import resolve_checkpoint
    from .app import create_app
    from .server import Server

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port={args.port} is invalid: must be in [0, 65535]")
    for name in ("max_batch", "max_queue"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads={args.threads} is invalid: must be >= 1")
        torch.set_num_threads(args.threads)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host) and api_key is None:
        print(f"warning: listening on {args.host} without an API key: anyone who can reach this port can use "
              f"the model (set ${API_KEY_ENV} or --api-key)", file=sys.stderr)
    import uvicorn

    ckpt = resolve_checkpoint(args.model_dir)
    gen = Generator.from_checkpoint(ckpt, device=args.device, dtype=args.dtype)
    server = Server(gen, args.served_model_name or args.model_dir, max_batch=args.max_batch,
                    max_queue=args.max_queue, api_key=api_key, model_dir=ckpt)
    print(f"serving `{server.name}` ({gen.cfg.n_layer} layers, context {gen.cfg.block_size}, "
          f"{str(gen.dtype).removeprefix('torch.')}, {gen.device}) at http://{args.host}:{args.port}/v1 "
          f"(batch {args.max_batch}, queue {args.max_queue}, chat {'on' if server.chat else 'off'}, "
          f"API key {'required' if api_key else 'off'})", file=sys.stderr)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level)
    return 0

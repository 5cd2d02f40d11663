"""``scalelm serve MODEL``: the OpenAI-compatible server on uvicorn.

    scalelm serve runs/baby                                  # http://127.0.0.1:8000/v1
    scalelm serve runs/baby --port 9000 --batch-size 16 --served-model-name baby
    SCALELM_API_KEY=secret scalelm serve runs/baby --host 0.0.0.0   # reachable from the network: use a key
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
from typing import Optional

from ..cliargs import TORCH_NAMES, add_deprecated, add_dtype_arg, add_model_arg
from ..errors import UserError
from . import MAX_BATCH, PREFILL_CHUNK, PREFIX_CACHE_MB

API_KEY_ENV = "SCALELM_API_KEY"


def add_serve_parser(p) -> None:
    add_model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 = every interface, then set an API key)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--api-key", default=None, help=f"require `Authorization: Bearer KEY` on every route but "
                   f"/health and the web chat page at / (default: ${API_KEY_ENV}, which keeps the key out of `ps`; unset = no key)")
    p.add_argument("--batch-size", type=int, default=MAX_BATCH,
                   help=f"rows decoded together, at most (default {MAX_BATCH})")
    add_deprecated(p, "--max-batch", "--batch-size")
    p.add_argument("--max-queue", type=int, default=64, help="sequences waiting for a row before requests "
                   "get 429 (default 64)")
    p.add_argument("--prefix-cache-mb", type=float, default=PREFIX_CACHE_MB, metavar="MB",
                   help=f"memory for the keys/values of prompt prefixes that requests share, reused instead of "
                        f"prefilled again (default {PREFIX_CACHE_MB}; 0 = off; docs/serving.md)")
    p.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK, metavar="N",
                   help=f"while rows decode, prefill at most N prompt tokens between two of their steps, so a "
                        f"long prompt does not stall them (default {PREFILL_CHUNK}; 0 = whole prompts)")
    p.add_argument("--served-model-name", metavar="NAME", help="the model's name in the API "
                   "(default: MODEL as given)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    add_dtype_arg(p, help="weights and cache dtype; auto = bf16 on a GPU that has it, else fp32")
    p.add_argument("--truncate-prompts", action="store_true", help="a prompt too long for the context keeps its "
                   "last tokens (room left for max_tokens) instead of failing with 400; usage.prompt_tokens_dropped "
                   "says how many went (for lm-eval and other clients that send whole documents)")
    p.add_argument("--threads", type=int, help="CPU threads for the model (default: torch's)")
    p.add_argument("--steer-vector", action="append", default=[], metavar="NAME=FILE",
                   help="load a steering vector (`scalelm steer`) that requests can name in a `steer` object "
                        "(repeatable; docs/interpretability.md)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key_of(args) -> Optional[str]:
    """--api-key, else $SCALELM_API_KEY, else None. An empty key would serve without one (the
    gate skips a falsy key), and one with spaces around it cannot be matched: both are refused."""
    key, src = (args.api_key, "--api-key") if args.api_key is not None else (os.environ.get(API_KEY_ENV),
                                                                             f"${API_KEY_ENV}")
    if key is None:
        return None
    if not key.strip():
        raise UserError(f"{src} is empty: give a key, or leave out --api-key and unset ${API_KEY_ENV} to serve "
                        "without one")
    if key != key.strip() or not (key.isascii() and key.isprintable()):
        raise UserError(f"{src} has spaces around it or characters other than printable ASCII: clients could not "
                        "send it in an Authorization header")
    return key


def steer_vectors_of(args) -> dict:
    """``--steer-vector NAME=FILE`` -> ``{name: (vector, layer)}`` (the layer the file was built at)."""
    from ..interp.steering import load_vector

    out = {}
    for spec in args.steer_vector:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--steer-vector {spec!r}: give NAME=FILE")
        if name in out:
            raise UserError(f"--steer-vector: the name {name!r} is given twice")
        vec, meta = load_vector(path)
        if "layer" not in meta:
            raise UserError(f"--steer-vector {name}: {path} does not say its layer (write it with `scalelm steer`)")
        out[name] = (vec, meta["layer"])
    return out


BIND_HINTS = {errno.EADDRINUSE: "another process listens there: stop it or pick another --port",
              errno.EADDRNOTAVAIL: "no network interface of this machine has that address",
              errno.EACCES: "ports below 1024 need privileges: pick a --port above 1023"}


def bind(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address of ``host`` (as asyncio would bind them), for uvicorn to serve
    on. Bound before the model loads, so that an address that cannot be used fails at once, in one
    line, rather than in uvicorn after minutes of loading; and no other process can take the port
    meanwhile."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: not an address or a name this machine can resolve ({e.strerror})") from None
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys((i[0], i[1], i[2], None, i[4]) for i in infos):
            s = socket.socket(family, kind, proto)
            socks.append(s)
            if os.name == "posix":  # as asyncio: a restart binds while old connections are in TIME_WAIT
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(socks) > 1:  # one free port for every address
                addr = (addr[0], socks[0].getsockname()[1], *addr[2:])
            s.bind(addr)
    except OSError as e:
        for s in socks:
            s.close()
        hint = BIND_HINTS.get(e.errno, "")
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}{'; ' + hint if hint else ''}") from None
    return socks


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
    for name in ("batch_size", "max_queue"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: must be >= 1")
    for name in ("prefix_cache_mb", "prefill_chunk"):
        if not getattr(args, name) >= 0:  # (NaN too)
            raise UserError(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: must be >= 0")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads={args.threads} is invalid: must be >= 1")
        torch.set_num_threads(args.threads)
    api_key = api_key_of(args)
    named = steer_vectors_of(args)  # the files, read before the port is taken
    from ..checkpoint.kinds import LANGUAGE_MODELS, require_kind

    require_kind(args.model, "scalelm serve", LANGUAGE_MODELS)  # before the port is taken
    socks = bind(args.host, args.port)
    try:
        if not is_loopback(args.host) and api_key is None:
            print(f"warning: listening on {args.host} without an API key: anyone who can reach this port can use "
                  f"the model (set ${API_KEY_ENV} or --api-key)", file=sys.stderr)
        ckpt = resolve_checkpoint(args.model)
        gen = Generator.from_checkpoint(ckpt, device=args.device, dtype=TORCH_NAMES.get(args.dtype, args.dtype))
        from ..interp.steering import check_vector

        for name, (vec, layer) in named.items():
            try:
                check_vector(gen, vec, layer)
            except UserError as e:
                raise UserError(f"--steer-vector {name}: {e}") from None
        server = Server(gen, args.served_model_name or args.model, max_batch=args.batch_size,
                        max_queue=args.max_queue, api_key=api_key, model_dir=ckpt,
                        truncate_prompts=args.truncate_prompts, steer_vectors=named,
                        prefix_cache_mb=args.prefix_cache_mb, prefill_chunk=args.prefill_chunk)
        port = socks[0].getsockname()[1]
        print(f"serving `{server.name}` ({gen.cfg.n_layer} layers, context {gen.cfg.block_size}, "
              f"{str(gen.dtype).removeprefix('torch.')}, {gen.device}) at http://{args.host}:{port}/v1 "
              f"(batch {args.batch_size}, queue {args.max_queue}, prefix cache "
              f"{f'{args.prefix_cache_mb:g} MB' if args.prefix_cache_mb else 'off'}, prefill chunk "
              f"{args.prefill_chunk or 'off'}, chat {'on' if server.chat else 'off'}, "
              f"API key {'required' if api_key else 'off'}"
              f"{', long prompts truncated' if args.truncate_prompts else ''}); web chat at "
              f"http://{args.host}:{port}/", file=sys.stderr)
        import uvicorn

        uv = uvicorn.Server(uvicorn.Config(create_app(server), host=args.host, port=args.port,  # (its log line)
                                           log_level=args.log_level))
        try:
            uv.run(sockets=socks)
        except KeyboardInterrupt:
            pass
    finally:
        for s in socks:
            s.close()
    return 0 if uv.started else 3  # 3: uvicorn's code for a server that did not start (it logged why)

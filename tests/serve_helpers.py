"""A live `scalelm serve` on 127.0.0.1 in this process, for the server and harness tests."""

import socket
import threading
import time

import httpx
import openai
import uvicorn

from scalelm.generate.generator import Generator
from scalelm.serve.app import create_app
from scalelm.serve.server import Server


class Live:
    """A server on 127.0.0.1 in a background thread (uvicorn.Server), up once /health answers."""

    def __init__(self, model_dir, name="tiny", step_delay=0.0, **kw):
        self.server = Server(Generator.from_checkpoint(model_dir), name, model_dir=model_dir, **kw)
        if step_delay:  # slow the decode steps down so that timing-dependent behaviour is observable
            eng, decode = self.server.engine, self.server.engine._decode
            eng._decode = lambda out: (time.sleep(step_delay), decode(out))[1]
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets (else Nagle adds 40 ms per reply)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.uv = uvicorn.Server(uvicorn.Config(create_app(self.server), log_level="warning"))
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not start")

    def client(self, api_key="none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()

    def close(self):
        self.uv.should_exit = True
        self.thread.join(10)

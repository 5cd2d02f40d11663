"""`scalelm serve`'s request extension `steer` (a steering vector, scalelm/interp/steering.py): each
request steered alone, even when it shares the decode batch with others; malformed ones are 400s."""

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from scalelm.config import ModelConfig  # noqa: E402
from scalelm.generate.generator import Generator  # noqa: E402
from scalelm.generate.sampling import SamplingParams  # noqa: E402
from scalelm.interp.steering import steer  # noqa: E402
from scalelm.model.gpt import GPT  # noqa: E402
from scalelm.serve.app import create_app  # noqa: E402
from scalelm.serve.server import Server  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")
GREEDY = SamplingParams(temperature=0.0)
PROMPT = [5, 17, 42, 8]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=64, init_std=0.3)).eval()
    vec = torch.randn(64) * 2
    gen = Generator(m, None, eos_ids=[])
    server = Server(gen, "tiny", max_batch=4, steer_vectors={"up": (vec, 1)})
    with TestClient(create_app(server)) as client:
        yield gen, vec, client


def complete(client, **extra):
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 10, "temperature": 0, **extra})
    return r


def tokens_of(gen, r) -> list:
    assert r.status_code == 200, r.text
    return [c["text"] for c in r.json()["choices"]]


def reference(gen, vec, layer, scale) -> list[int]:
    with steer(gen, vec, layer, scale):
        return gen.generate(PROMPT, 10, sampling=GREEDY)[0].tokens


def test_a_steered_request_equals_the_steered_generator(setup):
    gen, vec, client = setup
    # the server answers token ids as text only with a tokenizer: compare through logprobs' tokens
    def ids(r):
        assert r.status_code == 200, r.text
        return [int(t.removeprefix("token_id:")) for t in r.json()["choices"][0]["logprobs"]["tokens"]]

    plain = ids(complete(client, logprobs=0))
    named = ids(complete(client, logprobs=0, steer={"vector": "up", "scale": 3.0}))
    inline = ids(complete(client, logprobs=0, steer={"vector": (vec * 3.0).tolist(), "layer": 1}))
    assert plain == gen.generate(PROMPT, 10, sampling=GREEDY)[0].tokens
    assert named == reference(gen, vec, 1, 3.0) == inline
    assert named != plain
    other = ids(complete(client, logprobs=0, steer={"vector": "up", "layer": 0, "scale": -2}))
    assert other == reference(gen, vec, 0, -2.0)


def test_steered_and_plain_rows_share_a_batch(setup):
    """Rows decode together: each gets its own vector (or none)."""
    from concurrent.futures import ThreadPoolExecutor

    gen, vec, client = setup
    asks = [None, {"vector": "up", "scale": 3.0}, None, {"vector": "up", "layer": 0, "scale": -2}] * 2

    def run(st):
        body = {"logprobs": 0, "max_tokens": 16}
        if st is not None:
            body["steer"] = st
        r = complete(client, **body)
        assert r.status_code == 200, r.text
        return [int(t.removeprefix("token_id:")) for t in r.json()["choices"][0]["logprobs"]["tokens"]]

    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(run, asks))

    def want(st):
        if st is None:
            return gen.generate(PROMPT, 16, sampling=GREEDY)[0].tokens
        with steer(gen, vec, st.get("layer", 1), st["scale"]):
            return gen.generate(PROMPT, 16, sampling=GREEDY)[0].tokens

    assert got == [want(st) for st in asks]


@pytest.mark.parametrize("bad,param", [
    ({"vector": "nope"}, "steer.vector"),
    ({"vector": [0.5] * 10, "layer": 0}, "steer.vector"),
    ({"vector": [0.5] * 64}, "steer.layer"),
    ({"vector": "up", "layer": 9}, "steer.layer"),
    ({"vector": "up", "scale": "big"}, "steer.scale"),
    ({"vector": "up", "scale": 1e9}, "steer"),
    ({"vector": [1e30] * 64, "layer": 0}, "steer.scale"),  # the stream would overflow: inf, NaN, no JSON
    ({"vector": 12}, "steer"),
    ({"layer": 1}, "steer"),
    ("up", "steer"),
])
def test_malformed_steering_is_a_400_in_openai_shape(setup, bad, param):
    _, _, client = setup
    for path, body in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions",
                                                                 {"messages": [{"role": "user", "content": "hi"}]})):
        r = client.post(path, json={**body, "max_tokens": 2, "steer": bad})
        if path.endswith("chat/completions") and r.status_code == 400 and r.json()["error"]["param"] == "messages":
            continue  # this model has no chat template: that is checked first
        assert r.status_code == 400, (bad, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert (err["param"] or "").startswith(param), (bad, err)

"""The web chat page at `/` of `scalelm serve`, in headless Chromium driven by playwright.

Servers are live on 127.0.0.1 (tests/serve_helpers.py) with a tiny random-weight model; the
browser is the system's Chromium (Debian's chromium-headless-shell, installed by .ci/run), not
one playwright downloads. Without Chromium or playwright the browser tests skip; the test of
the routes and the key rule needs neither.
"""

import json
import re
import shutil
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

import torch  # noqa: E402

from scalelm.config import ModelConfig  # noqa: E402
from scalelm.model import GPT  # noqa: E402
from scalelm.model.io import save_model_dir  # noqa: E402
from serve_helpers import Live  # noqa: E402

TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
KEY = "web-chat-key-123"
STATIC = ("/static/chat.js", "/static/chat.css")

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _chromium():
    """The system's Chromium: the headless shell first (all a test needs), else a full browser."""
    return next((p for p in map(shutil.which, ("chromium-headless-shell", "chromium", "chromium-browser",
                                               "google-chrome")) if p), None)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, tiny_tokenizer_json):
    root = tmp_path_factory.mktemp("webchat")
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=300, block_size=128, n_layer=2, n_head=4, n_embd=64, tie_embeddings=False,
                        init_std=0.3))
    save_model_dir(m, root / "chat", tokenizer_json=tiny_tokenizer_json)
    (root / "chat" / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return root / "chat"


@pytest.fixture(scope="module")
def live(chat_dir):
    """Decode steps of >= 30 ms: a reply streams over many network reads, and Stop lands mid-reply."""
    s = Live(chat_dir, step_delay=0.03, max_batch=4, max_queue=16)
    yield s
    s.close()


@pytest.fixture(scope="module")
def keyed(chat_dir):
    s = Live(chat_dir, max_batch=4, max_queue=16, api_key=KEY)
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install "
                                   "playwright; it drives the system Chromium, no `playwright install` needed)")
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium installed (apt-get install chromium-headless-shell)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        yield b
        b.close()


class Page:
    """A fresh browser context (its own sessionStorage) on the chat page, recording what goes wrong in it:
    uncaught errors and console errors (a Content-Security-Policy violation is one)."""

    def __init__(self, browser, url, width=900, height=700):
        self.ctx = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.ctx.new_page()
        self.errors, self.requests = [], []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: m.type == "error" and not m.text.startswith("Failed to load resource")
                     and self.errors.append(m.text))
        self.page.on("request", lambda r: "/v1/chat/completions" in r.url and self.requests.append(r))
        self.page.set_default_timeout(10_000)
        self.page.goto(url + "/")

    def settings(self, **values):
        if self.page.locator("#settings").get_attribute("open") is None:
            self.page.click("#settings summary")
        for field, value in values.items():
            self.page.fill("#" + field.replace("_", "-"), str(value))

    def say(self, text: str, turns: int):
        """Type a message, send it, wait for the `turns`-th reply to end (its stats or its error)."""
        self.page.fill("#input", text)
        self.page.click("#send")
        self.page.locator(".turn.assistant").nth(turns - 1).locator(".stats, [role=alert]").wait_for()

    def replies(self) -> list[str]:
        return self.page.locator(".turn.assistant .text").all_text_contents()

    def close(self):
        self.ctx.close()


def test_the_page_is_public_and_the_api_keeps_its_key(keyed):
    """`/` and its files answer without the key (HEAD too); /v1 still needs it; a missing file is
    a 404 in OpenAI's error shape; nothing on the page loads from elsewhere (it works offline)."""
    get = httpx.get(keyed.url + "/")
    assert get.status_code == 200 and get.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in get.headers["content-security-policy"]
    head = httpx.head(keyed.url + "/")
    assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == str(len(get.content))
    texts = [get.text]
    for path, kind in zip(STATIC, ("text/javascript", "text/css")):
        r = httpx.get(keyed.url + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
        assert httpx.head(keyed.url + path).status_code == 200
        texts.append(r.text)
    for page in texts:  # no CDN, no web font, no absolute URL at all
        assert not re.search(r"https?:|//[a-z]|@import|url\(", page, re.I), page[:200]
    for path in ("/static/nope.js", "/static/index.html", "/static/"):
        r = httpx.get(keyed.url + path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
    assert httpx.get(keyed.url + "/v1/models").status_code == 401
    assert httpx.post(keyed.url + "/v1/chat/completions", json={"messages": []}).status_code == 401
    assert httpx.get(keyed.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_a_conversation_streams_replies_with_tokens_per_second(browser, live, keyed):
    """Two turns: each reply streams in (its text grows over several network reads), equals the API's
    answer to the same messages, and ends with its token count and tokens/s; the second request sends
    the whole conversation as `messages`."""
    p = Page(browser, live.url)
    try:
        p.page.wait_for_function("() => document.querySelector('#model').textContent.startsWith('tiny')")
        p.settings(system="Answer briefly.", temperature=0, max_tokens=12)
        # each observer callback is one task of the page's: text that grows in several is streamed
        p.page.evaluate("""() => { window.growth = 0;
            new MutationObserver(() => { window.growth += 1; })
              .observe(document.querySelector('#transcript'), {subtree: true, characterData: true}); }""")
        p.say("Hello there", 1)
        assert p.page.evaluate("window.growth") >= 3
        first = p.replies()[0]
        messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello there"}]
        want = keyed.client(KEY).chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                                         temperature=0)
        assert first == want.choices[0].message.content and first
        stats = p.page.locator(".turn.assistant .stats").first
        assert re.fullmatch(r"12 tokens · [\d.]+ tokens/s · first token \d+ ms · cut at max tokens",
                            stats.text_content()), stats.text_content()
        assert float(stats.get_attribute("data-tokens-per-second")) > 0

        p.page.press("#input", "Enter")  # an empty message is not sent
        p.page.fill("#input", "And then?")
        p.page.press("#input", "Enter")
        p.page.locator(".turn.assistant").nth(1).locator(".stats").wait_for()
        sent = [r.post_data_json for r in p.requests]
        assert len(sent) == 2 and sent[1]["stream"] and sent[1]["stream_options"] == {"include_usage": True}
        assert sent[1]["messages"] == messages + [{"role": "assistant", "content": first},
                                                  {"role": "user", "content": "And then?"}]
        assert sent[1]["model"] == "tiny" and sent[1]["temperature"] == 0 and sent[1]["max_tokens"] == 12

        p.page.click("#clear")
        assert p.page.locator(".turn").count() == 0
        p.say("Hi", 1)
        assert [m["role"] for m in p.requests[-1].post_data_json["messages"]] == ["system", "user"]
        assert p.errors == []
    finally:
        p.close()


def test_stop_ends_the_reply_and_the_server_cancels_it(browser, live, keyed):
    """Stop aborts the stream: the text stops growing, the reply says so and stays in the conversation,
    and the server frees the row (its client went away) long before the reply would have ended."""
    p = Page(browser, live.url)
    try:
        p.settings(temperature=1, seed=7)  # no max tokens: the rest of the context, ~3 s at 30 ms a step
        p.page.fill("#input", "Tell me a long story")
        p.page.click("#send")
        reply = p.page.locator(".turn.assistant .text")
        p.page.wait_for_function("() => document.querySelector('.turn.assistant .text').textContent.length > 0")
        p.page.click("#stop")
        p.page.locator(".turn.assistant .stats").wait_for()
        assert "stopped" in p.page.locator(".stats").text_content()
        assert p.page.is_disabled("#stop") and p.page.is_enabled("#send")
        text = reply.text_content()
        deadline = time.time() + 2
        while live.health()["active_rows"] and time.time() < deadline:
            time.sleep(0.02)
        assert live.health()["active_rows"] == 0
        time.sleep(0.2)
        assert reply.text_content() == text  # nothing arrives after Stop
        # the same request, not stopped, is much longer (same seed: the same tokens)
        full = keyed.client(KEY).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Tell me a long story"}], temperature=1, seed=7)
        full = full.choices[0].message.content
        assert full.startswith(text) and len(full) > len(text) + 20
        p.settings(max_tokens=4)
        p.say("Go on", 2)  # the stopped reply is part of the conversation
        assert p.requests[-1].post_data_json["messages"][1] == {"role": "assistant", "content": text}
        assert p.errors == []
    finally:
        p.close()


def test_the_page_sends_the_api_key_typed_into_it(browser, keyed):
    """Without the key: the page says it needs one and a message fails with the server's 401 message (no
    crash; the message comes back to the input box); with it typed in: the model loads, replies stream,
    and every request carries `Authorization: Bearer KEY`."""
    p = Page(browser, keyed.url)
    try:
        p.page.wait_for_function("() => document.querySelector('#status').textContent.includes('API key')")
        assert p.page.locator("#settings").get_attribute("open") is not None
        p.settings(max_tokens=8)
        p.say("Hello", 1)
        error = p.page.locator(".turn.assistant [role=alert]")
        assert "401" in error.text_content() and "Incorrect or missing API key" in error.text_content()
        assert p.page.input_value("#input") == "Hello"
        assert "failed" in p.page.locator(".turn.user").get_attribute("class")

        p.page.fill("#api-key", KEY)
        p.page.press("#api-key", "Enter")  # a change: the page retries /v1/models with it
        p.page.wait_for_function("() => document.querySelector('#model').textContent.startsWith('tiny')")
        assert p.page.evaluate("sessionStorage.getItem('scalelm.apiKey')") == KEY
        p.page.click("#send")
        p.page.locator(".turn.assistant").nth(1).locator(".stats").wait_for()
        assert p.replies()[1] and "tokens/s" in p.page.locator(".stats").text_content()
        assert p.requests[-1].headers["authorization"] == f"Bearer {KEY}"
        assert len(p.requests[-1].post_data_json["messages"]) == 1  # the failed turn is not resent
        assert p.errors == []
    finally:
        p.close()


def test_model_output_is_shown_as_text_never_as_markup(browser, live):
    """A reply holding HTML stays characters (no element, no script run); an error event in the stream
    is shown as an error. The replies come from a stub of the route, as the model cannot be made to say
    them."""
    reply = '<img src=x onerror="window.pwned=1"><b>bold</b> & <script>window.pwned=2</script>'
    chunks = [reply[:10], reply[10:]]
    streams = [
        "".join(f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': c}, 'finish_reason': None}]})}\n\n"
                for c in chunks) + "data: [DONE]\n\n",
        'data: {"choices": [{"index": 0, "delta": {"content": "half"}, "finish_reason": null}]}\n\n'
        'data: {"error": {"message": "Generation failed: <i>boom</i>.", "type": "server_error"}}\n\n',
    ]
    p = Page(browser, live.url, width=360)  # a phone's width
    try:
        p.page.route("**/v1/chat/completions", lambda route: route.fulfill(
            status=200, headers={"Content-Type": "text/event-stream"}, body=streams.pop(0)))
        p.say("Say some HTML", 1)
        assert p.replies()[0] == reply
        assert p.page.locator("#transcript img, #transcript b, #transcript script, #transcript i").count() == 0
        p.say("Again", 2)
        error = p.page.locator(".turn.assistant").nth(1)
        assert "error" in error.get_attribute("class")
        assert error.locator(".text").text_content() == "half\n\nGeneration failed: <i>boom</i>."
        assert p.page.evaluate("window.pwned") is None
        # nothing wider than the phone's screen
        assert p.page.evaluate("document.documentElement.scrollWidth") <= 360
        assert p.errors == []
    finally:
        p.close()

"""One chat template for training and inference (scalelm/data/chat_template.py).

SFT training, ``scalelm chat`` and ``scalelm serve`` render a conversation with the same
``ChatTemplate``: the same text and the same token ids come out of all three paths, for the
built-in templates and for one that writes bos/eos strings. The template is code from a
checkpoint, so it runs in Jinja's sandbox: the usual escapes fail or render nothing.
"""

from __future__ import annotations

import pytest
import torch

from scalelm.config import ModelConfig
from scalelm.data.chat_template import ChatTemplate, ChatTemplateError, read_chat_template
from scalelm.data.tokenizer import byte_tokenizer, vocab_size_of
from scalelm.generate.chat import ChatFormat
from scalelm.generate.generator import Generator
from scalelm.model import GPT
from scalelm.model.io import save_model_dir
from scalelm.tasks.base import Base
from scalelm.tasks.sft.encode import Encoder
from scalelm.tasks.sft.template import CHATML
from scalelm.tasks.sft.train import prepare_chat

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"},
                {"role": "assistant", "content": "Hello. How can I help?"},
                {"role": "user", "content": "Name a colour, café-style: ünïcode too."}]
REPLY = {"role": "assistant", "content": "Blue."}
# a Hugging Face-style template that writes the bos/eos strings of tokenizer_config.json
WITH_BOS = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
            "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


@pytest.fixture(scope="module", params=["chatml", "alpaca", "bos"])
def sft_dir(request, tmp_path_factory):
    """A model directory as ``finetune sft`` writes it (its ``prepare_chat``: extended tokenizer,
    chat_template.jinja, tokenizer_config.json, stop ids), with the training side's Chat."""
    root = tmp_path_factory.mktemp(f"chat-{request.param}")
    spec, specials = request.param, None
    if spec == "bos":
        spec = str(root / "with_bos.jinja")
        (root / "with_bos.jinja").write_text(WITH_BOS, encoding="utf-8")
        specials = ["<|system|>", "<|user|>", "<|assistant|>"]
    # bos/eos strings that are not the end-of-text token: a path that decoded them from ids instead
    # of reading what training wrote would render other text
    base = Base(None, None, byte_tokenizer().to_str(), bos="<s>", eos="</s>")
    chat = prepare_chat(base, spec, specials, 256)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=vocab_size_of(chat.tokenizer), block_size=256, n_layer=1, n_head=2, n_embd=32))
    d = save_model_dir(model, root / "model", tokenizer_json=chat.files.tokenizer_json, extra=chat.files.meta,
                       files=chat.files.files)
    return d, chat


def test_training_chat_and_serve_render_one_conversation_alike(sft_dir):
    from scalelm.serve.app import chat_messages, chat_prompt_ids
    from scalelm.serve.schemas import ChatCompletionRequest
    from scalelm.serve.server import Server

    d, chat = sft_dir
    # training: the conversation with its reply, split into segments and tokenized one by one
    segs = chat.template.segments(CONVERSATION + [REPLY])
    assert segs[-1][1] and segs[-1][0].startswith("Blue.")
    enc = Encoder(chat.tokenizer, chat.template, 10_000).encode(CONVERSATION + [REPLY])
    reply_len = len(chat.tokenizer.encode(segs[-1][0], add_special_tokens=False).ids)
    sft_text, sft_ids = "".join(t for t, _ in segs[:-1]), enc.ids[:len(enc.ids) - reply_len].tolist()
    assert enc.sup[len(sft_ids):].all() and not enc.sup[len(sft_ids) - 1]

    # scalelm chat: the model directory's template, read back by the generator
    gen = Generator.from_checkpoint(d)
    fmt = ChatFormat(gen, d)
    chat_text, chat_ids = fmt.render(CONVERSATION), fmt.encode(CONVERSATION)

    # scalelm serve: the request's messages through the server's prompt building
    server = Server(gen, "tiny", model_dir=d)
    body = ChatCompletionRequest(model="tiny", messages=CONVERSATION)
    serve_text, serve_ids = server.chat.render(chat_messages(body)), chat_prompt_ids(server, body)

    assert sft_text.encode() == chat_text.encode() == serve_text.encode()
    assert sft_ids == chat_ids == serve_ids
    assert chat_text == chat.template.prompt(CONVERSATION)  # what training's template asks for the reply
    if "bos_token" in chat.template.text:
        assert chat_text.startswith("<s>") and "Hello. How can I help?</s>" in chat_text
    # every special token of the template is one id in all three (the tokenizer was extended)
    for t in chat.specials:
        if t in chat_text:
            assert chat.tokenizer.token_to_id(t) in chat_ids


def test_one_compiled_template_object_per_path(sft_dir):
    """chat and serve hold the same class SFT trains with (not a look-alike)."""
    from scalelm.serve.server import Server

    d, chat = sft_dir
    gen = Generator.from_checkpoint(d)
    assert type(ChatFormat(gen, d).template) is type(chat.template) is ChatTemplate
    assert type(Server(gen, "tiny", model_dir=d).chat.template) is ChatTemplate
    assert read_chat_template(d) == chat.template.text


ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__ }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ self._TemplateReference__context }}",
    "{{ '{0.__class__}'.format(messages) }}",
    "{{ messages|attr('__class__') }}",
    "{% set x = messages.append({'role': 'user', 'content': 'x'}) %}",
    "{{ (messages|first).update({'content': 'pwned'}) }}",
    "{{ range(10**9)|list|length }}",
]


@pytest.mark.parametrize("payload", ESCAPES)
def test_the_sandbox_blocks_every_escape(payload):
    msgs = [{"role": "user", "content": "hi"}]
    try:
        out = ChatTemplate(payload, name="probe").prompt(msgs)
    except ChatTemplateError as e:
        assert "the probe chat template" in str(e) and ("sandbox blocks" in str(e) or "Range too big" in str(e))
    else:
        assert out == ""  # an unsafe attribute is undefined: nothing of Python's internals gets out
    assert msgs == [{"role": "user", "content": "hi"}]  # the conversation is immutable to the template


def test_template_errors_say_which_template_where_and_what_to_do(tmp_path):
    with pytest.raises(ChatTemplateError, match=r"the chat template in X is not valid Jinja \(line 1\): .*; "
                                                r"fix it, or chat without it with --plain"):
        ChatTemplate("{% for m in messages %}{{ m.content", where="the chat template in X",
                     advice="fix it, or chat without it with --plain")
    refuse = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok",
                          name="strict")
    assert refuse.prompt([{"role": "user", "content": "a"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="the chat template refused the conversation: user first"):
        refuse.prompt([{"role": "system", "content": "a"}])
    with pytest.raises(ChatTemplateError, match="the strict chat template failed: TypeError"):
        ChatTemplate("{{ messages[0]['content'] + 1 }}", name="strict").prompt([{"role": "user", "content": "a"}])
    (tmp_path / "chat_template.jinja").write_bytes(b"caf\xe9")
    with pytest.raises(ChatTemplateError, match="not valid UTF-8"):
        read_chat_template(tmp_path)


def test_segments_concatenate_to_the_rendering_and_prompts_are_their_prefixes():
    t = ChatTemplate(CHATML, name="chatml")
    conv = CONVERSATION + [REPLY]
    segs = t.segments(conv)
    assert "".join(s for s, _ in segs) == t.render(conv)
    assert [r for _, r in segs] == [False, True, False, True]
    assert "".join(s for s, _ in segs[:2]) + segs[2][0] == t.prompt(CONVERSATION)
    assert t.end_of_turn(["<|im_start|>", "<|im_end|>"]) == ["<|im_end|>"]


def test_read_chat_template_prefers_the_jinja_file_then_tokenizer_config(tmp_path):
    import json

    assert read_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tools", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert read_chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert read_chat_template(tmp_path) == "J"

"""Tool calls in chat completions: OpenAI's ``tools`` and ``tool_choice``, rendered, constrained, parsed.

The format is Hermes/Qwen's: the model writes each call as ::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(several calls one per line group, up to :data:`MAX_CALLS`; one with ``parallel_tool_calls:
false``). A grammar keeps the reply to it (:mod:`scalelm.generate.constrained`, a Lark grammar
with each tool's parameters embedded as a JSON schema):

- ``required``: one or more calls to any of the tools, arguments valid for that tool;
- a named function: calls to that function only;
- ``auto`` (the default with tools): free text that does not start with ``<`` or a space, OR calls (with a
  ``response_format`` too: that JSON, or calls);
- ``none``: no constraint and no parsing: the reply is text (the tools are still shown).

Tools reach the prompt as Hugging Face templates receive them: a template that mentions
``tools`` gets the ``tools`` variable (``[{"type": "function", "function": {...}}]``) and
assistant messages with ``tool_calls`` (arguments as objects); any other template (the built-in
ones) gets :func:`tool_system_prompt` at the end of the system message (one is added when there
is none), and an assistant's earlier calls as their ``<tool_call>`` text. ``tool`` messages keep
their role (with ``tool_call_id``).

A finished reply that holds calls is answered as ``message.tool_calls`` with ``finish_reason``
``tool_calls``; streamed, each call is one ``tool_calls`` delta when its ``</tool_call>`` arrives
(text before a call streams as content). A reply cut by ``max_tokens`` keeps its text as content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Optional

from ..generate import constrained
from ..generate.constrained import Grammar, GrammarError
from .gate import APIError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_CALLS = 8  # calls in one reply when parallel_tool_calls (a bound: a random model ends)
CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)
NO_ARGS = {"type": "object", "properties": {}, "additionalProperties": False}
COMPACT = {"whitespace_flexible": False}  # as constrained.JSON_OPTIONS, inside a Lark grammar

TOOL_PROMPT = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
               "with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each "
               "function call, return a json object with function name and arguments within <tool_call></tool_call> "
               "XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")


@dataclass
class ToolPlan:
    """What a chat request's tools ask for: the tools (OpenAI's dicts), the choice, the grammar."""
    tools: list[dict] = field(default_factory=list)
    choice: str = "none"  # none | auto | required | named
    grammar: Optional[Grammar] = None
    param: str = "tools"

    @property
    def parses(self) -> bool:
        """Whether replies are read for calls."""
        return self.choice != "none" and bool(self.tools)


def tool_system_prompt(tools: list[dict]) -> str:
    """The default rendering of tools for templates that do not take ``tools`` (Qwen 2.5's text)."""
    return TOOL_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


def _parameters(fn, i: int) -> dict:
    p = fn.parameters
    if p is None or p == {}:
        return NO_ARGS
    where = f"tools[{i}].function.parameters"
    if p.get("type", "object") != "object":
        raise APIError(400, f"Invalid {where}: a function's parameters must be a JSON schema of type object, "
                            f"not {p.get('type')!r}.", param=where)
    return {**p, "type": "object"}


def _call_schema(name: str, params: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def plan(body, response_grammar: Optional[tuple] = None) -> ToolPlan:
    """The :class:`ToolPlan` of a chat request; 400s for tools and choices that do not fit."""
    tools, choice = body.tools, body.tool_choice
    if not tools:
        if choice is not None and choice != "none":
            raise APIError(400, "tool_choice needs tools: give `tools`, or leave tool_choice out.", param="tool_choice")
        if tools is not None:  # [] : OpenAI refuses an empty list
            raise APIError(400, "tools is an empty array: give at least one tool, or leave it out.", param="tools")
        return ToolPlan()
    names = [t.function.name for t in tools]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise APIError(400, f"Two tools are named {dup!r}: tool names must be unique.", param="tools")
    params = {t.function.name: _parameters(t.function, i) for i, t in enumerate(tools)}
    dicts = [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in tools]
    if choice is None:
        choice = "auto"
    if not isinstance(choice, str):  # a named function
        name = choice.function.name
        if name not in params:
            raise APIError(400, f"tool_choice names the function {name!r}, which is not among the tools "
                                f"({', '.join(names)}).", param="tool_choice")
        choice, allowed = "named", [name]
    else:
        allowed = names
    result = ToolPlan(dicts, choice)
    if choice == "none":
        return result
    schemas = [_call_schema(n, params[n]) for n in allowed]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    try:
        # compiled alone first: a tool schema llguidance refuses is named in the 400
        for i, t in enumerate(tools):
            if t.function.name in allowed:
                constrained.json_schema(params[t.function.name], what=f"the parameters of {t.function.name!r}")
    except GrammarError as e:
        raise APIError(400, f"Invalid tools: {e}.", param="tools", code="invalid_grammar") from None
    call = f'"{OPEN}\\n" %json {json.dumps({**schema, "x-guidance": COMPACT})} "\\n{CLOSE}"'
    calls = "call" if not body.parallel_tool_calls else f'call ("\\n" call){{0,{MAX_CALLS - 1}}}'
    lines = [f"calls: {calls}", f"call: {call}"]
    if choice == "auto":
        if response_grammar is not None:  # a reply in the asked format, or calls
            lines = ["start: reply | calls", f"reply: {response_grammar[0].rule}", *lines]
        else:
            lines = ["start: TEXT | calls", *lines, r"TEXT: /[^<\s][\s\S]*/"]
    else:
        lines = ["start: calls", *lines]
    result.grammar = constrained.lark("\n".join(lines), "the tool-call grammar")
    return result


# ----------------------------------------------------------------------------- the prompt
def conversation(body, messages: list[dict], template_text: str, tp: ToolPlan) -> tuple[list[dict], Optional[list]]:
    """``(messages, tools)`` to render: the request's tool calls and tool results put in, and the tools
    given to a template that takes them or written into the system message of one that does not."""
    native = "tools" in template_text or "tool_calls" in template_text
    out = []
    for m, src in zip(messages, body.messages):
        m = dict(m)
        if src.tool_call_id is not None:
            m["tool_call_id"] = src.tool_call_id
        if src.tool_calls:
            if native:
                m["tool_calls"] = [{"id": c.id, "type": "function",
                                    "function": {"name": c.function.name, "arguments": _args(c.function.arguments)}}
                                   for c in src.tool_calls]
            else:
                calls = "\n".join(f"{OPEN}\n" + json.dumps({"name": c.function.name,
                                                            "arguments": _args(c.function.arguments)},
                                                           ensure_ascii=False) + f"\n{CLOSE}"
                                  for c in src.tool_calls)
                m["content"] = (m["content"] + "\n" if m["content"] else "") + calls
        out.append(m)
    if not tp.tools or native:
        return out, tp.tools or None
    prompt = tool_system_prompt(tp.tools)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": (out[0]["content"] + "\n\n" if out[0]["content"] else "") + prompt}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out, None


def _args(text: str):
    """A call's arguments as templates take them: the object (its text when it is not JSON)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# ----------------------------------------------------------------------------- the reply
def new_call(name: str, arguments) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def parse_calls(text: str) -> Optional[list[dict]]:
    """The calls of a reply made of ``<tool_call>`` blocks only; None when it is text."""
    if not text.startswith(OPEN):
        return None
    calls, end = [], 0
    for m in CALL.finditer(text):
        if text[end:m.start()].strip():
            return None
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        calls.append(new_call(obj["name"], obj.get("arguments", {})))
        end = m.end()
    return calls if calls and not text[end:].strip() else None


def message(text: str, finish: Optional[str], tp: ToolPlan) -> tuple[dict, Optional[str]]:
    """The assistant message of a finished choice and its finish reason."""
    calls = parse_calls(text) if tp.parses and finish == "stop" else None
    if calls:
        return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": text}, finish


class CallStream:
    """A streamed reply split into content deltas and one ``tool_calls`` delta per finished call."""

    def __init__(self, tp: ToolPlan):
        self.active = tp.parses
        self.mode: Optional[str] = None if self.active else "text"  # decided by the reply's first character
        self.buf, self.calls = "", 0

    def feed(self, text: str) -> list[dict]:
        if self.mode == "text":
            return [{"content": text}] if text else []
        self.buf += text
        if self.mode is None:
            head = self.buf
            if not head:
                return []
            if not OPEN.startswith(head[:len(OPEN)]):
                self.mode = "text"
                out, self.buf = self.buf, ""
                return [{"content": out}]
            if len(head) < len(OPEN):
                return []
            self.mode = "calls"
        out = []
        while True:
            m = CALL.search(self.buf)
            if m is None:
                return out
            try:
                obj = json.loads(m.group(1))
                call = new_call(obj["name"], obj.get("arguments", {}))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                return out  # not a call after all: left to the end (content)
            out.append({"tool_calls": [{"index": self.calls, **call}]})
            self.calls += 1
            self.buf = self.buf[m.end():]

    def finish(self, finish: Optional[str]) -> tuple[list[dict], Optional[str]]:
        """What is left (as content) and the finish reason to send."""
        rest, self.buf = self.buf, ""
        deltas = [{"content": rest}] if rest.strip() or (rest and self.mode == "text") else []
        if self.calls and finish == "stop":
            return deltas, "tool_calls"
        return deltas, finish

"""Instruction data files -> conversations (lists of ``{"role", "content"}`` messages).

One reader for the usual shapes, told apart per record:

- Alpaca (``instruction``, ``input``, ``output``): a user turn (the instruction, then the input
  after a blank line when there is one) and the assistant's output;
- ``prompt`` / ``completion``: one user turn and its reply;
- chat ``messages``: system/user/assistant turns, several replies per conversation allowed;
- any two fields named by ``--prompt-field`` / ``--completion-field`` (GSM8K: question / answer).

Files are a JSON array (``.json``) or JSON Lines. Every bad record is a :class:`SFTDataError`
naming ``FILE:LINE`` (or ``FILE:[index]``).
"""

from __future__ import annotations

import json
from pathlib import Path

from ...data.lines import split_lines
from ...errors import UserError

ROLES = ("system", "user", "assistant")


class SFTDataError(UserError):
    """An instruction file that cannot be read as conversations."""


def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """``[(where, object), ...]`` of a JSON array or a JSONL file."""
    p = Path(path)
    if not p.is_file():
        raise SFTDataError(f"{p} not found" if not p.exists() else f"{p} is not a file")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SFTDataError(f"{p} is not UTF-8 (byte {e.start}): save it as UTF-8") from None
    if not text.strip():
        raise SFTDataError(f"{p} is empty: it needs one example per line (JSONL) or a JSON array")
    if text.lstrip().startswith("["):
        try:
            arr = json.loads(text)
        except json.JSONDecodeError as e:
            raise SFTDataError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
        items = [(f"{p}:[{i}]", obj) for i, obj in enumerate(arr)]
    else:
        items = []
        for n, line in enumerate(split_lines(text), 1):  # at \n only: U+2028 may sit inside a string
            if not line.strip():
                continue
            try:
                items.append((f"{p}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise SFTDataError(f"{p}:{n}: not valid JSON ({e.msg}); JSONL holds one object per line") from None
    for where, obj in items:
        if not isinstance(obj, dict):
            raise SFTDataError(f"{where}: expected a JSON object, got a {type(obj).__name__}")
    if not items:
        raise SFTDataError(f"{p} holds no examples")
    return items


def _str(obj: dict, key: str, where: str, allow_empty: bool = False) -> str:
    v = obj.get(key)
    if v is None and allow_empty:
        return ""
    if not isinstance(v, str) or (not allow_empty and not v.strip()):
        what = "missing" if key not in obj else "empty" if v == "" else f"a {type(v).__name__}, not text"
        raise SFTDataError(f"{where}: {key!r} is {what}")
    return v


def _messages(obj: dict, where: str) -> list[dict]:
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise SFTDataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for i, m in enumerate(msgs):
        at = f"{where}: message {i + 1}"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise SFTDataError(f"{at}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise SFTDataError(f"{at}: 'content' must be text")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise SFTDataError(f"{where}: the conversation has no assistant message to learn from")
    return out


def to_messages(obj: dict, where: str, prompt_field: str | None = None,
                completion_field: str | None = None) -> list[dict]:
    """One record as a conversation (the format is recognised from its keys)."""
    if prompt_field or completion_field:
        pf, cf = prompt_field or "prompt", completion_field or "completion"
        return [{"role": "user", "content": _str(obj, pf, where)},
                {"role": "assistant", "content": _str(obj, cf, where)}]
    if "messages" in obj:
        return _messages(obj, where)
    if "instruction" in obj and "output" in obj:
        inp = _str(obj, "input", where, allow_empty=True).strip()
        user = _str(obj, "instruction", where)
        return [{"role": "user", "content": f"{user}\n\n{inp}" if inp else user},
                {"role": "assistant", "content": _str(obj, "output", where)}]
    if "prompt" in obj and "completion" in obj:
        return [{"role": "user", "content": _str(obj, "prompt", where, allow_empty=True)},
                {"role": "assistant", "content": _str(obj, "completion", where)}]
    raise SFTDataError(f"{where}: unknown record (keys {sorted(obj)}): expected Alpaca 'instruction'/'input'/"
                       f"'output', 'prompt'/'completion', chat 'messages', or name the fields with "
                       f"--prompt-field/--completion-field")


def read_conversations(path: str | Path, prompt_field: str | None = None,
                       completion_field: str | None = None) -> list[tuple[str, list[dict]]]:
    """``[(where, messages), ...]`` of a file."""
    return [(w, to_messages(o, w, prompt_field, completion_field)) for w, o in read_records(path)]

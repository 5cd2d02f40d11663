"""Preference files -> pairs ``(prompt messages, chosen reply, rejected reply)``.

Three shapes, told apart per record (JSON Lines or a JSON array, as instruction files):

- ``prompt`` / ``chosen`` / ``rejected`` as text. A prompt in Anthropic's HH layout
  (``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant:"``) becomes its turns; any
  other prompt is one user turn;
- chat pairs: ``chosen`` and ``rejected`` as message lists that end in the assistant's reply and share
  what comes before it (or ``prompt`` as a message list and each reply a one-message list);
- HH dialogues: ``chosen`` and ``rejected`` as whole dialogues in the HH layout and no ``prompt``:
  split at the last ``\\n\\nAssistant:``, whose text must be the same in both up to there.

The base's chat template then renders them (:mod:`scalelm.tasks.preference.encode`). Every bad record
is one error naming ``FILE:LINE``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..sft.formats import ROLES, SFTDataError, read_records

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")


class PreferenceDataError(SFTDataError):
    """A preference file that cannot be read as pairs."""


@dataclass
class Pair:
    where: str  # FILE:LINE
    prompt: list  # messages before the reply
    chosen: str
    rejected: str


def hh_messages(text: str, where: str) -> list[dict]:
    """An HH dialogue (``\\n\\nHuman: ... \\n\\nAssistant: ...``) as messages; the text before the first
    turn must be empty."""
    parts = _TURN.split(text)
    if parts[0].strip():
        raise PreferenceDataError(f"{where}: an HH dialogue starts with '\\n\\nHuman:', not {parts[0][:30]!r}")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def _text(obj: dict, key: str, where: str, blank: bool = False) -> str:
    """``obj[key]`` as text; ``blank``: an empty reply is a reply too (HH has a few; one that says
    nothing can still be the worse one)."""
    v = obj.get(key)
    if not isinstance(v, str) or not (blank or v.strip()):
        what = "missing" if key not in obj else "blank" if isinstance(v, str) else f"a {type(v).__name__}, not text"
        raise PreferenceDataError(f"{where}: {key!r} is {what}")
    return v


def _messages(v, where: str, key: str) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise PreferenceDataError(f"{where}: {key!r} must be text or a non-empty list of {{'role', 'content'}} objects")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise PreferenceDataError(f"{where}: {key!r} message {i + 1} is not a {{'role': {'|'.join(ROLES)}, "
                                      f"'content': text}} object")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _split_reply(msgs: list[dict], where: str, key: str) -> tuple[list[dict], str]:
    if msgs[-1]["role"] != "assistant":
        raise PreferenceDataError(f"{where}: {key!r} must end with the assistant's reply, not a {msgs[-1]['role']} message")
    return msgs[:-1], msgs[-1]["content"]


def to_pair(obj: dict, where: str) -> Pair:
    if "chosen" not in obj or "rejected" not in obj:
        raise PreferenceDataError(f"{where}: a preference pair needs 'chosen' and 'rejected' (keys {sorted(obj)})")
    c, r = obj["chosen"], obj["rejected"]
    if isinstance(c, list) or isinstance(r, list):  # chat pairs
        pc, chosen = _split_reply(_messages(c, where, "chosen"), where, "chosen")
        pr, rejected = _split_reply(_messages(r, where, "rejected"), where, "rejected")
        if pc != pr:
            raise PreferenceDataError(f"{where}: 'chosen' and 'rejected' must share every message before the reply")
        prompt = pc
        if "prompt" in obj:
            p = obj["prompt"]
            prompt = [{"role": "user", "content": _text(obj, "prompt", where)}] if isinstance(p, str) else \
                _messages(p, where, "prompt")
            if pc and pc != prompt:
                raise PreferenceDataError(f"{where}: 'prompt' and the messages before the replies differ")
        if not prompt:
            raise PreferenceDataError(f"{where}: the pair has no prompt (no message before the replies)")
        return Pair(where, prompt, chosen, rejected)
    if "prompt" in obj:
        p = _text(obj, "prompt", where)
        prompt = hh_messages(p, where) if p.lstrip(" ").startswith(HUMAN) else [{"role": "user", "content": p}]
        if prompt and prompt[-1]["role"] == "assistant" and not prompt[-1]["content"]:
            prompt = prompt[:-1]  # HH prompts end in "\n\nAssistant:": the reply comes next
        return Pair(where, prompt, _text(obj, "chosen", where, blank=True).strip(),
                    _text(obj, "rejected", where, blank=True).strip())
    c, r = _text(obj, "chosen", where), _text(obj, "rejected", where)  # whole HH dialogues
    cut_c, cut_r = c.rfind(ASSISTANT), r.rfind(ASSISTANT)
    if cut_c < 0 or cut_r < 0:
        raise PreferenceDataError(f"{where}: without 'prompt', 'chosen' and 'rejected' are whole HH dialogues "
                                  f"ending in an '\\n\\nAssistant:' turn")
    if c[:cut_c] != r[:cut_r]:
        raise PreferenceDataError(f"{where}: the two HH dialogues differ before their last '\\n\\nAssistant:' turn")
    chosen, rejected = c[cut_c + len(ASSISTANT):].strip(), r[cut_r + len(ASSISTANT):].strip()
    return Pair(where, hh_messages(c[:cut_c], where), chosen, rejected)


def read_pairs(path: str | Path) -> list[Pair]:
    return [to_pair(obj, where) for where, obj in read_records(path)]

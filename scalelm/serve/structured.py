"""Structured output on the server: a request's ``response_format`` or vLLM's ``guided_*`` field as
a grammar compiled for the served model (:mod:`scalelm.generate.constrained`).

At most one of ``response_format`` (``json_object``, ``json_schema``), ``guided_json``,
``guided_regex`` and ``guided_choice`` may constrain a request; ``{"type": "text"}`` is no
constraint. Every sequence of the request (``n``, several prompts) gets its own matcher; the
engine masks each row's logits with it, in the batch with unconstrained rows. A schema, regex or
choice list the library cannot compile is a 400 whose message says why and whose ``param`` names
the field.
"""

from __future__ import annotations

from typing import Optional

from ..generate import constrained
from ..generate.constrained import Constraint, Grammar, GrammarError
from .gate import APIError


def request_grammar(body) -> Optional[tuple[Grammar, str]]:
    """``(grammar, the field it came from)`` of a completions or chat request; None without one."""
    given = []
    rf = body.response_format
    if rf is not None and rf.type != "text":
        given.append("response_format")
    given += [f for f in ("guided_json", "guided_regex", "guided_choice") if getattr(body, f) is not None]
    if len(given) > 1:
        raise APIError(400, f"Give at most one of response_format, guided_json, guided_regex and guided_choice "
                            f"(this request has {', '.join(given)}).", param=given[1])
    if not given:
        return None
    field = given[0]
    try:
        if field == "response_format":
            if rf.type == "json_object":
                if rf.json_schema is not None:
                    raise APIError(400, "response_format of type json_object takes no json_schema.",
                                   param="response_format.json_schema")
                return constrained.json_object(), field
            if rf.json_schema is None:
                raise APIError(400, "response_format of type json_schema needs a json_schema object "
                                    "({\"name\": ..., \"schema\": {...}}).", param="response_format.json_schema")
            schema = rf.json_schema.schema_
            return constrained.json_schema({} if schema is None else schema), "response_format.json_schema.schema"
        if field == "guided_json":
            return constrained.json_schema(body.guided_json), field
        if field == "guided_regex":
            return constrained.regex(body.guided_regex), field
        return constrained.choice(body.guided_choice), field
    except GrammarError as e:
        raise APIError(400, f"Invalid {field}: {e}.", param=field, code="invalid_grammar") from None


def compile_for(server, grammar: Grammar, param: str) -> Constraint:
    """The grammar compiled for the served model's tokenizer (a 400 when it cannot be)."""
    gen = server.gen
    try:
        return constrained.compile_grammar(grammar, gen.tokenizer, gen.cfg.vocab_size, gen.eos_ids)
    except GrammarError as e:
        raise APIError(400, f"Invalid {param}: {e}.", param=param, code="invalid_grammar") from None


def request_constraint(server, body) -> Optional[Constraint]:
    """The compiled constraint of a request's ``response_format``/``guided_*`` field, if any."""
    found = request_grammar(body)
    return None if found is None else compile_for(server, *found)

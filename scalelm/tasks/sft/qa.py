"""``scalelm eval RUN --task qa --data FILE [--answer-regex R]``: exact match of final answers.

Each question is put to the model the way ``scalelm chat`` would (its saved chat template), the
reply decoded greedily, and the final answer pulled out of reply and reference by the same
regular expression (GSM8K's ``#### 42`` by default; the last match counts, commas, ``$`` and a
trailing period dropped, numbers compared as numbers). A reference in which the expression finds
no answer cannot be compared with: that question is not scored for exact match, and the output
counts it (``no_reference_answer``, with a warning on stderr). Also the mean loss of the
reference replies (teacher-forced, reply tokens only, every question), the number ``best/`` is
chosen by.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

GSM8K_ANSWER = r"####\s*([^\n]+)"


def add_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--task qa")
    g.add_argument("--answer-regex", default=GSM8K_ANSWER,
                   help="how to find the final answer in a reply: group 1 of the last match "
                        "(default: GSM8K's '#### N')")
    g.add_argument("--prompt-field", help="the question's JSON field (default: the model's own, else question)")
    g.add_argument("--completion-field", help="the answer's JSON field (default: the model's own, else answer)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="longest reply (default 256)")


def extract(text: str, pattern: re.Pattern) -> str | None:
    """The normalised final answer in ``text`` (None when there is none)."""
    found = list(pattern.finditer(text))
    if not found:
        return None
    m = found[-1]
    ans = (m.group(1) if m.groups() else m.group(0)).strip()
    ans = ans.replace(",", "").replace("$", "").strip().rstrip(".").strip()
    try:
        v = float(ans)
        return repr(int(v)) if v.is_integer() else repr(v)
    except ValueError:
        return ans


def _fields(args, task: dict, path) -> tuple[str | None, str | None]:
    from .formats import read_records

    pf = args.prompt_field or task.get("prompt_field")
    cf = args.completion_field or task.get("completion_field")
    if pf is None and cf is None:
        first = read_records(path)[0][1]
        if "question" in first and "answer" in first:
            return "question", "answer"
    return pf, cf


def run_eval_qa(args: argparse.Namespace) -> int:
    import torch

    from ...checkpoint.model_dir import read_config
    from ...data.chat_template import ChatTemplate
    from ...errors import UserError
    from ...fileio import json_safe
    from ...generate.chat import checkpoint_template
    from ...generate.generator import Generator
    from ...generate.sampling import SamplingParams
    from ...model.io import load_model_dir
    from ...precision import autocast_context, pick_device, resolve_precision
    from ...runs import resolve_checkpoint
    from .encode import Encoder
    from .formats import read_conversations
    from .objective import completion_loss
    from .template import PLAIN

    if not args.data:
        raise UserError("--task qa scores questions with answers: --data FILE (JSONL, e.g. GSM8K's question/answer)")
    try:
        pattern = re.compile(args.answer_regex)
    except re.error as e:
        raise UserError(f"--answer-regex {args.answer_regex!r} is not a regular expression: {e}") from None
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise UserError("--max-new-tokens and --batch-size must be at least 1")
    ckpt = resolve_checkpoint(args.model)
    meta = read_config(ckpt)
    task = meta.get("task") if isinstance(meta.get("task"), dict) else {}
    convs = read_conversations(args.data, *_fields(args, task, args.data))
    if args.limit is not None:
        n = int(args.limit * len(convs)) if args.limit < 1 else int(args.limit)
        convs = convs[:max(1, n)]
    questions, golds, unanswered = [], [], []
    for where, msgs in convs:
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        gold = extract(msgs[last]["content"], pattern)
        if gold is None:  # nothing to compare a reply with: not scored (counted and reported), never a "miss"
            unanswered.append(where)
            continue
        questions.append(msgs[:last])
        golds.append(gold)
    if not questions:
        raise UserError(f"none of the {len(convs)} references in {args.data} has an answer --answer-regex "
                        f"{args.answer_regex!r} finds (e.g. {unanswered[0]}): give the regular expression that "
                        f"finds the final answer in your references")
    if unanswered:
        shown = ", ".join(unanswered[:3]) + (", ..." if len(unanswered) > 3 else "")
        print(f"warning: {len(unanswered)} of {len(convs)} references have no answer --answer-regex "
              f"{args.answer_regex!r} finds: those questions are not scored for exact match ({shown})",
              file=sys.stderr)
    device = pick_device(args.device)
    gen = Generator.from_checkpoint(ckpt, device=str(device), verify=not args.no_verify)
    if gen.tokenizer is None:
        raise UserError(f"{ckpt} has no tokenizer.json: --task qa needs the model's tokenizer")
    # the model's own template, as chat renders it; a model without one was trained on plain text
    template = checkpoint_template(gen, ckpt) or \
        ChatTemplate(PLAIN, eos_token=gen.decode([min(gen.eos_ids)]) if gen.eos_ids else "", name="plain")
    from ...data.chat_template import ControlTokens

    # message text stays text (a control-token string in a question is its characters), as SFT encodes it
    controls = ControlTokens(gen.tokenizer)
    prompts = [controls.encode(template.prompt_marked(q, controls)) for q in questions]
    T = gen.cfg.block_size
    greedy = SamplingParams(temperature=0.0)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies = [""] * len(prompts)
    print(f"answering {len(prompts)} questions of {args.data} with {ckpt} on {device}", file=sys.stderr)
    cut = stopped = 0
    for lo in range(0, len(order), args.batch_size):
        idx = order[lo:lo + args.batch_size]
        rows = [prompts[i][-(T - 1):] for i in idx]
        cut += sum(len(prompts[i]) > T - 1 for i in idx)
        # each question its own budget (its own room in the context), whatever the batch holds; no stop
        # strings: a template's replies end at its end-of-turn token, a plain one's at end-of-text
        for i, c in zip(idx, gen.generate(rows, max_new_tokens=args.max_new_tokens, sampling=greedy, slide=False)):
            replies[i] = c.text
            stopped += bool(c.stopped_at_context)
    if cut or stopped:
        print(f"warning: {cut} question(s) longer than the context kept their last {T - 1} tokens; {stopped} "
              f"answer(s) stopped at the context limit", file=sys.stderr)
    preds = [extract(r, pattern) for r in replies]
    hits = sum(p is not None and p == g for p, g in zip(preds, golds))
    model = load_model_dir(ckpt, device=device, verify=False)
    enc = Encoder(gen.tokenizer, template, T)
    examples, _, _ = enc.encode_all(convs)
    precision = resolve_precision(args.dtype, device)
    with torch.no_grad():
        loss = completion_loss(model, examples, args.batch_size, device, autocast_context(precision, device))
    res = {"exact_match": hits / len(preds), "n": len(preds), "answered": sum(p is not None for p in preds),
           "no_reference_answer": len(unanswered), "questions_cut": cut, "stopped_at_context": stopped,
           "loss": loss["loss"], "supervised_tokens": loss["supervised_tokens"], "answer_regex": args.answer_regex}
    print(json.dumps(json_safe(res), allow_nan=False))
    return 0

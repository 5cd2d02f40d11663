"""``scalelm generate``: the command line around the :class:`~scalelm.generate.generator.Generator`.

    scalelm generate MODEL --prompt "To be" [--max-new-tokens N] [--temperature T] [--beams N] [--json]

The options ``generate`` and ``chat`` share (which model, where, in what precision; sampling), the
prompts (``--prompt``, ``--prompt-file``, stdin), and the printing of rows as they finish or stream.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

import torch

from ..cliargs import TORCH_NAMES, add_dtype_arg, add_model_arg
from ..fileio import json_safe
from .beam import add_beam_args, check_beam_args
from .cpu_layout import param_count
from .generator import Generator, Prompt
from .outputs import Completion, Event, GenerationError
from .sampling import SamplingParams
from .speculative import add_speculative_args, speculative_json, speculative_kwargs, speculative_summary
from .terminal import for_stdout

# ----------------------------------------------------------------------------- CLI

def add_model_args(p) -> None:
    """Options shared by ``generate`` and ``chat``: which model, where, in what precision."""
    add_model_arg(p)
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json (or a directory with one) "
                   "instead of the checkpoint's")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    add_dtype_arg(p, help="weights and cache dtype; auto = bf16 on a GPU that has it, else fp32 (bf16 is "
                          "faster on CPUs with avx512_bf16 or AMX)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (weights frozen "
                   "as constants; the first tokens wait for compilation, up to minutes on CPU)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's); on a busy machine 1 can be "
                   "much faster than oversubscribed cores")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the model's files against its manifest.json (sha256 of each)")


def add_sampling_args(p, temperature: float, top_k: int, top_p: float, max_new: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new, help=f"default {max_new}")
    p.add_argument("--temperature", type=float, default=temperature,
                   help=f"0 = greedy; default {temperature}")
    p.add_argument("--top-k", type=int, default=top_k, help=f"0 = off; default {top_k}")
    p.add_argument("--top-p", type=float, default=top_p, help=f"nucleus sampling, in (0, 1]; default {top_p}")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats; default 1")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0, metavar="N",
                   help="never repeat an N-gram of the sequence, prompt included (HF's); default 0: off")
    p.add_argument("--min-new-tokens", type=int, default=0, metavar="N",
                   help="no end-of-text before N new tokens; default 0")
    p.add_argument("--seed", type=int, help="makes sampling reproducible (printed when not given)")


def sampling_from_args(args) -> SamplingParams:
    return SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                          getattr(args, "no_repeat_ngram_size", 0), getattr(args, "min_new_tokens", 0)).validate()


def generator_from_args(args) -> Generator:
    import sys
    import time

    if args.threads is not None:
        if args.threads < 1:
            raise GenerationError(f"--threads={args.threads} is invalid: must be >= 1")
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    spec = speculative_kwargs(args)  # --draft / --prompt-lookup (generate, torch backend)
    backend = getattr(args, "backend", "torch")
    if backend == "onnxruntime":  # an ONNX export (scalelm export --format onnx)
        from .onnx_backend import check_ort_args

        check_ort_args(args)
    gen = Generator.from_checkpoint(
        args.model, args.tokenizer, args.device, TORCH_NAMES.get(args.dtype, args.dtype), args.compile,
        verify=not getattr(args, "no_verify", False), backend=backend, **spec)
    print(f"loaded {gen.cfg.n_layer}-layer model ({param_count(gen.cfg) / 1e6:.2f}M "
          f"params, {str(gen.dtype).removeprefix('torch.')}, {gen.device}) in {time.perf_counter() - t:.1f}s",
          file=sys.stderr)
    if gen.speculator is not None:
        print(gen.speculator.describe(), file=sys.stderr)
    return gen


def pick_seed(args, sampling: SamplingParams) -> Optional[int]:
    if sampling.greedy or args.seed is not None:
        return args.seed
    import sys

    seed = random.SystemRandom().randrange(2**31)
    print(f"seed {seed} (pass --seed {seed} to reproduce)", file=sys.stderr)
    return seed


def unescape(s: str) -> str:
    """Stop strings typed in a shell: '\\n' and '\\t' mean newline and tab."""
    return s.replace("\\n", "\n").replace("\\t", "\t")


def add_generate_parser(p) -> None:
    add_model_args(p)
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                   help="onnxruntime: run a directory from `scalelm export --format onnx` (CPU, fp32)")
    src = p.add_argument_group("prompt (none: start from end-of-text)")
    src.add_argument("--prompt", action="append", help="prompt text; repeat for a batch of prompts")
    src.add_argument("--prompt-file", metavar="F", help="read the prompt from a file ('-' = stdin)")
    src.add_argument("--prompt-ids", metavar="IDS", help="prompt as token ids, e.g. '1,2,3' (no tokenizer needed)")
    add_sampling_args(p, temperature=0.8, top_k=200, top_p=1.0, max_new=256)
    p.add_argument("--stop", nargs="+", action="extend", default=[], metavar="STR",
                   help="end a sample where it produces STR (not printed); '\\n' is a newline")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt, decoded as one batch")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--truncate", action="store_true",
                   help="keep the last 3/4 of the context of a prompt longer than it (else an error)")
    p.add_argument("--echo", action="store_true", help="print the prompt before its continuation")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-text")
    p.add_argument("--json", action="store_true", help="one JSON object per sample (tokens, text, finish reason)")
    p.add_argument("--raw", action="store_true", help="write control characters as they are even to a terminal "
                   "(by default a terminal gets them escaped, e.g. \\x1b; pipes always get the plain text)")
    add_structure_args(p)
    add_steer_args(p)
    add_speculative_args(p)
    add_beam_args(p)  # last: it records the defaults of the options it refuses


def add_structure_args(p) -> None:
    g = p.add_argument_group("structured output (every sample matches; it ends when complete)")
    g = g.add_mutually_exclusive_group()
    g.add_argument("--json-schema", metavar="FILE", help="JSON that validates against the JSON schema in FILE")
    g.add_argument("--regex", metavar="RE", help="text that matches the regular expression RE as a whole")
    g.add_argument("--choice", nargs="+", metavar="STR", help="exactly one of these strings")


def grammar_from_args(args):
    """The :class:`~scalelm.generate.constrained.Grammar` that ``--json-schema``/``--regex``/``--choice`` ask for."""
    from . import constrained

    if getattr(args, "json_schema", None):
        f = Path(args.json_schema)
        if not f.is_file():
            raise GenerationError(f"--json-schema {f}: no such file")
        return constrained.json_schema(_utf8(f.read_bytes(), str(f)), what=f"the JSON schema in {f}")
    if getattr(args, "regex", None) is not None:
        return constrained.regex(args.regex)
    if getattr(args, "choice", None):
        return constrained.choice(args.choice)
    return None


def add_steer_args(p) -> None:
    g = p.add_argument_group("steering (vectors from `scalelm steer`; docs/interpretability.md)")
    g.add_argument("--steer", metavar="VEC", help="a steering vector (.safetensors): scale x vector is added to the "
                   "residual stream entering --steer-layer, at every position, while generating")
    g.add_argument("--steer-layer", type=int, metavar="L", help="the layer (default: the one the vector was built at)")
    g.add_argument("--steer-scale", type=float, metavar="S", help="the vector's multiplier (default 1; negative "
                   "steers the other way)")


def steering_from_args(args):
    """``(vector, layer, scale)`` of --steer (read before the model loads), or None without it."""
    import math

    from ..interp.steering import load_vector

    if args.steer is None:
        if args.steer_layer is not None or args.steer_scale is not None:
            raise GenerationError("--steer-layer and --steer-scale need --steer VEC")
        return None
    if args.backend == "onnxruntime":
        raise GenerationError("--steer adds to the model's activations: it needs the PyTorch backend")
    vec, meta = load_vector(args.steer)
    layer = args.steer_layer if args.steer_layer is not None else meta.get("layer")
    if layer is None:
        raise GenerationError(f"{args.steer} does not say its layer: give --steer-layer")
    scale = 1.0 if args.steer_scale is None else args.steer_scale
    if not math.isfinite(scale):
        raise GenerationError(f"--steer-scale {scale} is not a finite number")
    return vec, layer, scale


def steering_context(gen, steering):
    """The ``with`` that adds the vector to ``gen``'s model (nothing without --steer)."""
    import contextlib

    if steering is None:
        return contextlib.nullcontext()
    from ..interp.steering import steer

    return steer(gen, *steering)


def _read_prompts(args) -> list[Prompt]:
    import sys

    given = [x for x in (args.prompt, args.prompt_file, args.prompt_ids) if x is not None]
    if len(given) > 1:
        raise GenerationError("give only one of --prompt, --prompt-file, --prompt-ids")
    if args.prompt_file is not None:
        if args.prompt_file == "-":
            stdin = getattr(sys.stdin, "buffer", None)
            return [_utf8(stdin.read(), "standard input", False) if stdin is not None else sys.stdin.read()]
        f = Path(args.prompt_file)
        if not f.is_file():
            raise GenerationError(f"prompt file not found: {f}")
        return [_utf8(f.read_bytes(), str(f))]
    if args.prompt_ids is not None:
        try:
            return [[int(x) for x in args.prompt_ids.replace(",", " ").split()]]
        except ValueError:
            raise GenerationError(f"--prompt-ids must be integers separated by commas or spaces, "
                                  f"got {args.prompt_ids!r}") from None
    for i, p in enumerate(args.prompt or []):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:  # argv bytes that were not UTF-8 arrive surrogate-escaped
            raise GenerationError(f"--prompt number {i + 1} is not valid UTF-8 (at character {e.start}): "
                                  "set a UTF-8 locale or encoding in your shell, or put the text in a UTF-8 "
                                  "file for --prompt-file") from None
    return args.prompt if args.prompt else [""]


def _utf8(data: bytes, where: str, universal_newlines: bool = True) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GenerationError(f"{where} is not valid UTF-8 (byte {e.start}): convert it first, e.g. "
                              "`iconv -f latin1 -t utf-8`, or give token ids with --prompt-ids") from None
    # as Path.read_text did for files (stdin on POSIX keeps its \r)
    return text.replace("\r\n", "\n").replace("\r", "\n") if universal_newlines else text


class _RowPrinter:
    """Streams rows to stdout in order: the current row live, later rows buffered until their turn."""

    def __init__(self, gen: Generator, prompts: list, num_samples: int, echo: bool, raw: bool = False):
        self.gen, self.prompts, self.k, self.echo = gen, prompts, num_samples, echo
        self.safe = for_stdout(raw)
        self.n = len(prompts) * num_samples
        self.cur, self.pending, self.finished = 0, [""] * self.n, set()
        self.started = False

    def _head(self, b: int) -> str:
        head = "\n" + "-" * 40 + "\n" if b else ""
        if self.echo:
            p = self.prompts[b // self.k]
            head += p if isinstance(p, str) else self.gen.decode(p)
        return head

    def _write(self, text: str) -> None:
        import sys

        sys.stdout.write(self.safe(text))
        sys.stdout.flush()

    def event(self, ev: Event) -> None:
        piece = ev.text if self.gen.tokenizer is not None else (f"{ev.token} " if ev.token is not None else "")
        if ev.index == self.cur:
            if not self.started:
                self.started = True
                piece = self._head(self.cur) + piece
            self._write(piece)
        else:
            self.pending[ev.index] += piece
        if ev.finish_reason is not None:
            self.finished.add(ev.index)
        while self.cur in self.finished and self.cur < self.n:
            if not self.started:
                self._write(self._head(self.cur))
            self.cur += 1
            if self.cur < self.n:
                self._write(self._head(self.cur) + self.pending[self.cur])
            self.started = True


def run_generate(args) -> int:
    import sys
    import time

    beams = check_beam_args(args)  # before loading anything: a wrong combination fails fast
    steering = steering_from_args(args)  # the vector file, read before the model loads
    if args.backend != "onnxruntime":  # a decoder-only LM (an ONNX export is checked by its loader)
        from ..checkpoint.kinds import LANGUAGE_MODELS, require_kind

        require_kind(args.model, "scalelm generate", LANGUAGE_MODELS)
    sampling = sampling_from_args(args)
    prompts = _read_prompts(args)
    grammar = grammar_from_args(args)  # the schema file, read before the model loads
    gen = generator_from_args(args)
    if gen.tokenizer is None and any(isinstance(p, str) for p in prompts):
        raise GenerationError(f"{args.model} has no tokenizer.json: pass --tokenizer PATH, or the prompt "
                              "as token ids with --prompt-ids")
    printer = None
    t0, t_first, n_tok = time.perf_counter(), None, 0
    with steering_context(gen, steering):  # --steer: the vector is added while this runs
        if beams:  # one best continuation per prompt, known only when the search ends
            comps = gen.beam_search(prompts, args.beams, args.max_new_tokens, truncate=args.truncate,
                                    ignore_eos=args.ignore_eos, length_penalty=args.length_penalty,
                                    repetition_penalty=sampling.repetition_penalty,
                                    no_repeat_ngram_size=sampling.no_repeat_ngram_size,
                                    min_new_tokens=sampling.min_new_tokens)
            n_tok = sum(len(c.tokens) for c in comps)
        else:
            seed = pick_seed(args, sampling)
            printer = (_RowPrinter(gen, prompts, args.num_samples, args.echo, args.raw)
                       if args.stream and not args.json else None)
            out: dict[int, Completion] = {}
            for ev in gen.stream(prompts, args.max_new_tokens, sampling=sampling,
                                 stop=[unescape(s) for s in args.stop], seed=seed, num_samples=args.num_samples,
                                 truncate=args.truncate, ignore_eos=args.ignore_eos, completions=out,
                                 grammar=grammar):
                if ev.token is not None:
                    n_tok += 1
                    t_first = t_first or time.perf_counter()
                if printer:
                    printer.event(ev)
            comps = [out[i] for i in sorted(out)]
    elapsed = time.perf_counter() - t0
    if args.json:
        for c in comps:
            print(json.dumps(json_safe({"index": c.index, "prompt_index": c.index // args.num_samples,
                                        "prompt_tokens": len(c.prompt_tokens), "tokens": c.tokens,
                                        "text": c.text, "finish_reason": c.finish_reason,
                                        "prompt_cut_tokens": c.prompt_cut_tokens, "context_slides": c.context_slides,
                                        "stopped_at_context": c.stopped_at_context,
                                        **speculative_json(c)}), allow_nan=False))
    elif printer:
        print()
    else:
        heads = _RowPrinter(gen, prompts, args.num_samples, args.echo, args.raw)
        print(heads.safe("".join(heads._head(c.index) + (c.text if gen.tokenizer is not None else
                                                         " ".join(map(str, c.tokens)) + " ") for c in comps)))
    ttft = f", first token after {1e3 * (t_first - t0):.0f} ms" if t_first else ""
    print(f"generated {n_tok} tokens in {elapsed:.2f}s ({n_tok / elapsed:.1f} tok/s{ttft}); "
          f"finish: {', '.join(c.finish_reason for c in comps)}", file=sys.stderr)
    if speculative_summary(comps):
        print(speculative_summary(comps), file=sys.stderr)
    warning = context_warning(comps, args.num_samples if not beams else 1, gen.window_keep)
    if warning:
        print(warning, file=sys.stderr)
    return 0


def context_warning(comps: list[Completion], num_samples: int = 1, keep: int = 0) -> Optional[str]:
    """One stderr line on what the context limit did to a batch (None when nothing): prompts cut
    by ``--truncate``, outputs whose window slid, outputs that stopped at the limit (beam search)."""
    cut = len({c.index // num_samples for c in comps if c.prompt_cut_tokens})
    slid = sum(1 for c in comps if c.context_slides)
    stopped = sum(1 for c in comps if c.stopped_at_context)
    parts = []
    if cut:
        parts.append(f"{cut} prompt{'s were' if cut > 1 else ' was'} longer than the context (cut to "
                     f"{'their' if cut > 1 else 'its'} last {keep} tokens)")
    if slid:
        parts.append(f"{slid} output{'s' if slid > 1 else ''} outgrew the context (the window slid: the start of "
                     f"{'their' if slid > 1 else 'its'} text was no longer seen)")
    if stopped:
        parts.append(f"{stopped} output{'s' if stopped > 1 else ''} stopped at the context limit")
    return "warning: " + "; ".join(parts) if parts else None

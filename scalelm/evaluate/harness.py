"""lm-evaluation-harness backend: ``scalelm eval RUN --harness TASKS`` runs ``lm_eval.simple_evaluate``
on a scalelm model directory, registered as lm-eval model ``scalelm``.

``ScalelmLM`` is a ``TemplateLM``, so context/continuation tokenization (trailing spaces, empty
contexts, the prefix token) is lm-eval's own and matches its ``hf`` model on an HF export of the
same checkpoint. Scoring runs batched forwards in fp32 by default; generation uses the KV-cached
``Generator``. Local tasks (no Hub at run time) ship in ``tasks/``: ``scalelm_sst2`` (multiple
choice on an SST-format file) and ``scalelm_text_ppl`` (rolling perplexity of a text file); both
read the file named by ``--harness-data``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import UserError
from .harness_data import check_local_data

TASKS_DIR = Path(__file__).with_name("tasks")


_LM_CLASS = None


def _lm_class():
    """``ScalelmLM``, defined (and registered with lm-eval) on first use: lm-eval is an extra."""
    global _LM_CLASS
    if _LM_CLASS is not None:
        return _LM_CLASS
    try:
        import lm_eval.models  # noqa: F401 (lm-eval fills its registry lazily only while it is empty)
        from lm_eval.api.model import TemplateLM
        from lm_eval.api.registry import register_model
    except ImportError as e:
        raise UserError(f"--harness needs lm-evaluation-harness: pip install 'scalelm[eval]' ({e})") from None

    @register_model("scalelm")
    class ScalelmLM(TemplateLM):
        def __init__(self, pretrained: str, device: str = "cpu", batch_size: int = 8, dtype: str = "float32",
                     verify: bool = True):
            super().__init__()
            from tokenizers import Tokenizer

            from ..model.hf import special_token_ids
            from ..model.io import load_model_dir
            from ..runs import TOKENIZER, resolve_checkpoint

            self.ckpt = resolve_checkpoint(pretrained)
            if not (self.ckpt / TOKENIZER).is_file():
                raise UserError(f"{self.ckpt} has no {TOKENIZER}: the harness needs the model's tokenizer")
            self.tok = Tokenizer.from_file(str(self.ckpt / TOKENIZER))
            self._device = torch.device(device)
            dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
            self.model = load_model_dir(self.ckpt, device=self._device, dtype=dt).eval()
            bos, eos = special_token_ids(self.ckpt)
            self.eos_ids = list(eos) if isinstance(eos, list) else ([eos] if eos is not None else [])
            self._eot = self.eos_ids[0] if self.eos_ids else 0
            self._prefix = bos if bos is not None else self._eot
            self.max_length = self.model.cfg.block_size
            self.batch_size = int(batch_size)
            self._gen = None

        @property
        def eot_token_id(self) -> int:
            return self._eot

        @property
        def prefix_token_id(self) -> int:
            return self._prefix

        def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kw) -> list[int]:
            return self.tok.encode(string, add_special_tokens=False).ids

        def tok_decode(self, ids) -> str:
            return self.tok.decode(list(ids))

        @torch.no_grad()
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw) -> list[tuple[float, bool]]:
            """(sum of log p(continuation | context), is the continuation the greedy one) per request.
            As lm-eval's HF model: the last max_length + 1 tokens of context + continuation."""
            rows = []
            for i, (_, ctx, cont) in enumerate(requests):
                full = (list(ctx) + list(cont))[-(self.max_length + 1):]
                rows.append((i, full, len(cont)))
            rows.sort(key=lambda r: -len(r[1]))  # similar lengths share a batch: less padding
            out: list[Optional[tuple[float, bool]]] = [None] * len(rows)
            for lo in range(0, len(rows), self.batch_size):
                chunk = rows[lo:lo + self.batch_size]
                width = len(chunk[0][1]) - 1
                x = torch.zeros(len(chunk), width, dtype=torch.long)
                for j, (_, full, _) in enumerate(chunk):
                    x[j, :len(full) - 1] = torch.tensor(full[:-1])
                logp = F.log_softmax(self.model(x.to(self._device))[0].float(), dim=-1)
                for j, (i, full, n) in enumerate(chunk):
                    end = len(full) - 1
                    target = torch.tensor(full[-n:], device=logp.device)
                    lp = logp[j, end - n:end]
                    out[i] = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            scores = []
            for req in requests:
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    token_list=self.tok_encode(req.args[0]), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                scores.append(sum(s for s, _ in self._loglikelihood_tokens([(None, c, t) for c, t in windows])))
            return scores

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            from ..generate.generator import Generator
            from ..generate.sampling import SamplingParams

            if self._gen is None:
                self._gen = Generator(self.model, self.tok, eos_ids=self.eos_ids, bos_id=None)
            texts = []
            for req in requests:
                context, kw = req.args
                kw = dict(kw or {})
                until = kw.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kw.pop("max_gen_toks", 256))
                temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
                ids = self.tok_encode(context)[-max(1, self.max_length - max_new):]
                comp = self._gen.generate(ids, max_new, sampling=SamplingParams(temperature=temperature),
                                          stop=until, seed=0)[0]
                text = comp.text
                for s in until:  # the stop string itself is not part of the answer
                    text = text.split(s)[0]
                texts.append(text)
            return texts

    _LM_CLASS = ScalelmLM
    return ScalelmLM


def run_harness(ckpt, tasks: str, include: Optional[str], limit: Optional[float], data_file: Optional[str],
                batch_size: int, device: str, verify: bool = True, log_samples: bool = False) -> dict:
    lm_cls = _lm_class()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + ([include] if include else [])
    metadata = {"data_file": str(Path(data_file).resolve())} if data_file else {}
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    # indexing lm-eval's own thousands of task files takes long on a small CPU: only when asked for one
    tm = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    if any(n not in tm.all_tasks for n in names):
        tm = TaskManager(include_path=paths, metadata=metadata)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        local = sorted(n for n in tm.all_tasks if n.startswith("scalelm_"))
        raise UserError(f"unknown harness task(s) {unknown}: the local ones are {local}; add yours with "
                        f"--harness-include DIR (tasks from the Hub cannot be downloaded here)")
    local = sorted(n for n in names if n.startswith("scalelm_"))
    if local and not data_file:
        raise UserError(f"{', '.join(local)} read a local file: pass --harness-data FILE")
    if data_file and not Path(data_file).is_file():
        raise UserError(f"--harness-data {data_file}: no such file")
    # read as the local tasks will, before the model loads: refused if unreadable, skipped lines counted
    data_report = check_local_data(local, data_file) if local else {}
    lm = lm_cls(str(ckpt), device=device, batch_size=batch_size, verify=verify)
    from ..quiet import no_git_probe

    no_git_probe()
    res = simple_evaluate(model=lm, tasks=names, task_manager=tm, limit=limit, log_samples=log_samples,
                          metadata=metadata)
    out = {"results": res["results"], "n_samples": res.get("n-samples"), "versions": res.get("versions")}
    if data_report:
        out["harness_data"] = {"file": str(data_file), **data_report}
    if log_samples:
        out["samples"] = res["samples"]
    return out

"""The cleaning report, ``clean_report.json`` beside ``meta.json``: what each step removed or changed.

    {"format": "scalelm-clean-report", "version": 1,
     "documents": {"in": N, "out": n}, "bytes": {"in": B, "out": b},
     "steps": [{"step": "decontaminate", "removed_documents": k, "removed_bytes": ..., "files": [...],
                "examples": [...]},
               {"step": "quality", ..., "thresholds": {...}, "by_rule": {...}},
               {"step": "dedup", ..., "method": "exact" | "minhash"},
               {"step": "scrub_pii", "documents_changed": k, "replaced": {"email": ...}, "examples": [...]}]}

Steps appear in the order they run and only when asked for. Bytes are UTF-8 bytes of text. An
example of a removed document is its number in the corpus (0-based, in reading order), why, and
the start of its text (scrubbed, when ``--scrub-pii`` is on); a PII example is the text around a
placeholder, never the value it replaced. At most ``EXAMPLES`` examples per step, the first ones.
The report holds no time stamp: the same corpus and options give the same file.
"""

from __future__ import annotations

from collections import Counter

FORMAT, VERSION = "scalelm-clean-report", 1
EXAMPLES = 5
REPORT = "clean_report.json"


class StepLog:
    """Counts and the first examples of one filtering step."""

    def __init__(self, name: str, **settings):
        self.name, self.settings = name, settings
        self.documents = self.bytes = 0
        self.examples: list[dict] = []

    def removed(self, doc: int, nbytes: int, why: dict, text: str) -> None:
        self.documents += 1
        self.bytes += nbytes
        if len(self.examples) < EXAMPLES:
            self.examples.append({"document": doc, **why, "text": text})

    def to_dict(self, **extra) -> dict:
        return {"step": self.name, **self.settings, "removed_documents": self.documents,
                "removed_bytes": self.bytes, **extra, "examples": self.examples}


def build(docs_in: int, bytes_in: int, docs_out: int, bytes_out: int, steps: list[dict]) -> dict:
    return {"format": FORMAT, "version": VERSION,
            "documents": {"in": docs_in, "out": docs_out}, "bytes": {"in": bytes_in, "out": bytes_out},
            "steps": steps}


def summary(report: dict) -> dict:
    """The short form kept in meta.json: what was removed or replaced, and where the report is."""
    removed = {s["step"]: s["removed_documents"] for s in report["steps"] if "removed_documents" in s}
    out = {"steps": [s["step"] for s in report["steps"]], "documents": report["documents"],
           "removed": removed, "report": REPORT}
    pii = next((s for s in report["steps"] if s["step"] == "scrub_pii"), None)
    if pii is not None:
        out["pii_replaced"] = pii["replaced"]
    return out


def log_line(report: dict) -> str:
    """One line for stderr: documents in and out, what each step did."""
    parts = []
    for s in report["steps"]:
        if s["step"] == "scrub_pii":
            got = ", ".join(f"{k} {v:,}" for k, v in s["replaced"].items() if v) or "nothing"
            parts.append(f"scrub_pii replaced {got}")
        else:
            extra = ""
            if s["step"] == "decontaminate":
                hit = [f"{f['file']} ({f['documents_hit']})" for f in s["files"] if f["documents_hit"]]
                extra = f" [hit: {', '.join(hit)}]" if hit else ""
            if s["step"] == "quality" and s["by_rule"]:
                extra = " [" + ", ".join(f"{k} {v:,}" for k, v in Counter(s["by_rule"]).most_common(4)) + "]"
            parts.append(f"{s['step']} -{s['removed_documents']:,}{extra}")
    d = report["documents"]
    return f"clean: {d['in']:,} documents in, {d['out']:,} out; " + "; ".join(parts)

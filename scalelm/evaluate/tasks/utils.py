"""Datasets of scalelm's local lm-eval tasks: read the file given by ``--harness-data`` (lm-eval passes
the run's metadata to ``custom_dataset``). Nothing is downloaded."""

from pathlib import Path


def _file(kw: dict, task: str) -> Path:
    path = kw.get("data_file")
    if not path:
        raise ValueError(f"{task} reads a local file: pass --harness-data FILE")
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{task}: --harness-data {p} is not a file")
    return p


def sst(**kw):
    """SST format: '<label> <sentence>' per line (0 negative, 1 positive)."""
    import datasets

    rows = []
    for line in _file(kw, "scalelm_sst2").read_text(encoding="utf-8").splitlines():
        label, _, sentence = line.strip().partition(" ")
        if label in ("0", "1") and sentence:
            rows.append({"sentence": sentence, "label": int(label)})
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


def text_file(**kw):
    """One document per blank-line-separated paragraph of a UTF-8 text file."""
    import datasets

    text = _file(kw, "scalelm_text_ppl").read_text(encoding="utf-8")
    docs = [d.strip("\n") for d in text.split("\n\n") if d.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": d} for d in docs])})

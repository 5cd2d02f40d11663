"""Datasets of scalelm's local lm-eval tasks: read the file given by ``--harness-data`` (lm-eval passes
the run's metadata to ``custom_dataset``). Nothing is downloaded. The parsing is
:mod:`scalelm.evaluate.harness_data`'s, which ``scalelm eval --harness`` runs first to refuse a
file that cannot be scored and to count the lines that cannot."""

from pathlib import Path

from scalelm.evaluate.harness_data import read_paragraphs, read_sst


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

    rows = read_sst(_file(kw, "scalelm_sst2")).rows
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


def text_file(**kw):
    """One document per blank-line-separated paragraph of a UTF-8 text file."""
    import datasets

    docs = read_paragraphs(_file(kw, "scalelm_text_ppl"))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": d} for d in docs])})

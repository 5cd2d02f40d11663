"""Peak memory of `prepare` stays bounded on a corpus larger than the memory budget."""

import json
import subprocess
import sys

import numpy as np
import pytest

CORPUS_MB = 200
BUDGET_MB = 100  # growth of the peak RSS allowed while preparing (the corpus is twice that)

# Peak RSS from /proc (VmHWM): ru_maxrss is inherited across exec from the (bigger) parent and
# would hide the child's own peak. Writing 5 to clear_refs restarts the peak after the imports.
MEASURE = """
import json, sys
def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = vm("VmRSS")
except OSError:
    base = vm("VmHWM")
"""

CHILD = """
from scalelm.data.prepare import prepare
""" + MEASURE + """
meta = prepare(sys.argv[1], sys.argv[2], tokenizer="byte", progress=False)
print(json.dumps({"base_mb": base, "peak_mb": vm("VmHWM"), "meta": meta}))
"""


def write_corpus(path, nbytes, seed=0):
    """Pseudo-words in lines, documents separated by <|endoftext|>, written in a stream."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9))) for _ in range(3000)]
    docs = []
    for _ in range(300):
        idx = rng.integers(0, len(words), int(rng.integers(50, 600)))
        docs.append("\n".join(" ".join(words[i] for i in idx[j:j + 12]) for j in range(0, len(idx), 12)))
    written, n_docs = 0, 0
    with open(path, "w") as f:
        while written < nbytes:
            for i in rng.permutation(len(docs)):
                f.write(docs[i] + "\n<|endoftext|>\n")
                written, n_docs = written + len(docs[i]) + 15, n_docs + 1
                if written >= nbytes:
                    break
    return written, n_docs


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_prepare_memory_is_bounded_on_a_corpus_twice_the_budget(tmp_path):
    corpus = tmp_path / "big.txt"
    size, n_docs = write_corpus(corpus, CORPUS_MB << 20)
    p = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.splitlines()[-1])
    meta = r["meta"]
    assert meta["stats"]["documents"] == n_docs and meta["stats"]["truncated"] is False
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    assert tokens == meta["stats"]["bytes"] + n_docs  # every byte, plus one end-of-text per document
    grew = r["peak_mb"] - r["base_mb"]
    assert 0 < grew < BUDGET_MB < size / 2 ** 20, f"peak RSS grew by {grew:.0f} MB preparing {size / 2 ** 20:.0f} MB"

"""Token classification: a linear head on every position of a GPT or an encoder (``scalelm finetune
tokens``, ``scalelm tag``, ``scalelm eval --task tokens``, ``scalelm convert --to-hf``).

Modules: ``formats`` (CoNLL, CoNLL-U and JSONL readers, the layout ``tag`` writes back),
``schemes`` (IOB1/IOB2/BIOES detection, conversion to IOB2, repair), ``align`` (words to subword
windows, the first subword carries the label), ``model`` (``Tagger``), ``files`` (``TaggerFiles``,
``load_tagger``), ``metrics`` (seqeval entity scores or token accuracy, the Trainer's evaluation),
``train`` (the finetune command), ``cli`` (``tag`` and ``eval --task tokens``), ``hf``
(``*ForTokenClassification`` export). Imported lazily: the CLI's parser stays light.
"""

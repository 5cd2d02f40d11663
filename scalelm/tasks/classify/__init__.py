"""Text classification: a linear head on a GPT's pooled hidden state (``scalelm finetune classify``,
``scalelm classify``, ``scalelm eval --task classify``, ``scalelm convert --to-hf``).

Modules: ``data`` (readers, labels, tokenization, batches), ``model`` (``Classifier``), ``files``
(``ClassifierFiles``, ``load_classifier``), ``metrics``, ``train`` (the finetune command), ``cli``,
``hf`` (``*ForSequenceClassification`` export). Imported lazily: the CLI's parser stays light.
"""

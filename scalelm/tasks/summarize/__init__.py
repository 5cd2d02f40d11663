"""Summarization (``scalelm finetune summarize``, ``scalelm summarize``, ``eval --task summarize``): the
sequence-to-sequence recipe of translation, scored by ROUGE."""

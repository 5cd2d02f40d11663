"""Data quality and privacy for ``scalelm prepare``: deduplication, PII scrubbing, the Gopher
quality rules and decontamination against evaluation files, all decided in prepare's scan pass
(see :mod:`.pipeline`) and described in ``clean_report.json`` (:mod:`.report`).

One module per step: :mod:`.decontam`, :mod:`.quality`, :mod:`.dedup`, :mod:`.pii`.
"""

from .options import CleanOptions, add_clean_args, options_from_args
from .pii import PLACEHOLDERS, scrub
from .pipeline import Cleaner

__all__ = ["CleanOptions", "Cleaner", "PLACEHOLDERS", "add_clean_args", "options_from_args", "scrub"]

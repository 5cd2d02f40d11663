"""Generation: ``Generator`` (KV-cached batched decoding, streaming, stop strings), sampling,
incremental text decoding, CPU weight layouts for decoding, and ``scalelm chat``."""

from .generator import Completion, Event, GenerationError, Generator, generate_text
from .sampling import SamplingParams

__all__ = ["Completion", "Event", "GenerationError", "Generator", "SamplingParams", "generate_text"]

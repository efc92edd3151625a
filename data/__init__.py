"""Sources and formats in, one canonical record per family out, tokenised exactly; collators."""

from data.build import DataBundle, build_datasets
from data.collators import length_grouped_batches, make_collator, sequence_lengths
from data.config import DataConfig
from data.errors import DataError
from data.report import DataReport
from data.tokenize import IGNORE_INDEX, check_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "DataBundle",
    "DataConfig",
    "DataError",
    "DataReport",
    "build_datasets",
    "check_tokenizer",
    "length_grouped_batches",
    "make_collator",
    "sequence_lengths",
]

"""Sources and formats in, one canonical record per family out, tokenised exactly; collators."""

from data.config import DataConfig

__all__ = ["DataConfig"]

"""The former name of lorakit.per_row's module, kept so `from lorakit.mixed_batch import per_row` still works."""

from .per_row import per_row

__all__ = ["per_row"]

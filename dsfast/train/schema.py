"""The base of every config section (``dsfast.train.config`` and each method's ``loss`` section)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Unknown keys are errors, values are frozen, numbers given for strings become strings, no nan or inf."""

    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True, allow_inf_nan=False)

"""The base every spec model shares."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A model that rejects fields it does not know, so typos fail loudly."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

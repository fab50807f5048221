"""Request bodies that answer every field they do not honour with a 400 naming it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class StrictPart(BaseModel):
    """A part of a request body: a field not listed is a 400 naming it, never ignored; an unknown field sent
    as null counts as left out (some SDKs send every field they know). A field a client may send that the
    server does not use is listed with "Accepted; not used" in its description, so the document says so."""

    # The document says so too: any other property may only be null.
    model_config = ConfigDict(extra="forbid", json_schema_extra={"additionalProperties": {"type": "null"}})

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k in cls.model_fields}
        return data


class StrictBody(StrictPart):
    """A request body (the top level), strict as its parts are."""

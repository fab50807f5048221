"""How a chat reply's shape is asked for and reported: response_format (structured output) and logprobs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from ..errors import BadRequest
from ..structured import JSON_OBJECT, check_schema
from ..types import TokenLogprob as TokenLogprobData
from .strict import StrictPart

MAX_TOP_LOGPROBS = 20


class JsonSchemaSpec(StrictPart):
    """The schema of response_format json_schema (OpenAI's shape)."""

    model_config = ConfigDict(populate_by_name=True)

    name: StrictStr = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: StrictStr | None = None
    schema_: dict[str, Any] = Field(
        default_factory=lambda: dict(JSON_OBJECT),
        alias="schema",
        description="A JSON schema using the keywords both engines enforce (README: Structured output).",
    )
    strict: StrictBool | None = Field(None, description="Accepted; the schema is always enforced.")


def format_schema(kind: str, schema: dict[str, Any] | None, param: str) -> dict[str, Any] | None:
    """The JSON schema a reply format enforces (checked; param names the schema's field), None for text.

    json_object may carry a schema too (llama-server's shape); without one it is any JSON object."""
    if kind == "text":
        return None
    if kind == "json_object" and schema is None:
        return dict(JSON_OBJECT)
    if schema is None:
        raise BadRequest(f"{param}: field required", param=param)
    check_schema(schema, param)
    return schema


class ResponseFormat(StrictPart):
    """OpenAI's response_format: free text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None
    schema_: dict[str, Any] | None = Field(
        None, alias="schema", description="With json_object (llama-server's shape): the schema the object matches."
    )

    def schema_to_enforce(self) -> dict[str, Any] | None:
        """The JSON schema the reply must match (checked), or None for free text."""
        if self.type == "json_schema":
            if self.json_schema is None:
                raise BadRequest("response_format.json_schema: field required", param="response_format.json_schema")
            return format_schema(self.type, self.json_schema.schema_, "response_format.json_schema.schema")
        return format_schema(self.type, self.schema_, "response_format.schema")


class TopLogprob(BaseModel):
    """A candidate token: its text, log-probability (the raw model's, before temperature) and UTF-8 bytes."""

    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    """A generated token with the likeliest candidates at its position, best first."""

    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """Per-token log-probabilities of the choice's content."""

    content: list[TokenLogprob] | None
    refusal: None = None

    @classmethod
    def of(cls, tokens: list[TokenLogprobData]) -> ChoiceLogprobs:
        """OpenAI's shape of an engine's per-token logprobs."""
        return cls(
            content=[
                TokenLogprob(
                    token=t.token,
                    logprob=t.logprob,
                    bytes=list(t.bytes),
                    top_logprobs=[TopLogprob(token=c.token, logprob=c.logprob, bytes=list(c.bytes)) for c in t.top],
                )
                for t in tokens
            ]
        )

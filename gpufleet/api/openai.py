"""Request bodies of the OpenAI-compatible endpoints, validated once at the edge.

Both the pod server and the router parse these: the router needs ``model`` and
``exclusive_gpu`` to route, the pod server everything else. Which fields exist and what
happens to each is the table in ``gpufleet.api.fields``: a field not in it, or a refused
field with a value other than its default, is a 400 naming it.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gpufleet.api.fields import Endpoint, check_fields, refused_schema

MAX_TOKENS_LIMIT = 4096
MAX_CHOICES = 16
MAX_EMBEDDING_INPUTS = 256


def _whole_number(value: Any) -> Any:
    # JSON does not tell 3 from 3.0, and neither does JSON Schema's "integer"; strict mode would.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer as JSON Schema means it: 3.0 is one, "3" is not. (The bounds go before the validator,
# or pydantic leaves them out of the schema.)
_WHOLE = BeforeValidator(_whole_number)
TokenCount = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT), _WHOLE]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1), _WHOLE]  # 64-bit signed, as OpenAI's


def _add_refused(schema: dict[str, Any], cls: type[BaseModel]) -> None:
    endpoint: Endpoint | None = getattr(cls, "endpoint", None)
    if endpoint is not None:
        schema.setdefault("properties", {}).update(refused_schema(endpoint))


class _Body(BaseModel):
    # Unknown fields are refused by name (fields.check_fields); forbid is the backstop. Strict: "5" is
    # no integer, as the OpenAPI document says (schemathesis holds us to it).
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_add_refused)
    endpoint: ClassVar[Endpoint]

    model: str = Field(min_length=1)
    user: str | None = Field(default=None, description="The end user: metadata, no effect on the answer.")
    exclusive_gpu: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "Serve only here: 'cuda:1' on a pod; through the router also 'pod/cuda:1', 'node/cuda:1', a pod, "
            "a node or a GPU UUID ('GPU-...'). A target naming a device must name exactly one."
        ),
    )
    lease: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "Id of an exclusive lease (POST /api/leases on the router; or header x-gpufleet-lease, which wins "
            "when both are set): the request runs only on the lease's devices, which serve nobody else. The router "
            "consumes it; pod servers refuse it."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        return check_fields(cls.endpoint, data)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False
    include_obfuscation: Literal[False] | None = Field(default=None, description="Only false: no padding is sent.")


class _Generation(_Body):
    max_tokens: TokenCount | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: Seed | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES), _WHOLE] = Field(default=1, description="Choices for the prompt.")
    # vLLM's extensions (its SamplingParams names), so vLLM's benchmark clients drive us unchanged.
    ignore_eos: bool = Field(
        default=False,
        description="gpufleet extension (vLLM's name): never stop at an end token, so generation runs to "
        "max_tokens (a stop string still ends it).",
    )
    min_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS_LIMIT), _WHOLE] = Field(
        default=0,
        description="gpufleet extension (vLLM's name): no end token, and no stop string, before this many "
        "tokens; at most max_tokens.",
    )

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str


# Message fields of tool and audio conversations: refused (tools and audio are), unless empty.
_REFUSED_MESSAGE_FIELDS = ("tool_calls", "tool_call_id", "function_call", "audio", "refusal")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, description="Passed to the model's chat template.")

    @model_validator(mode="before")
    @classmethod
    def _refused(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name in _REFUSED_MESSAGE_FIELDS:
            if name in out:
                if out[name] not in (None, []):
                    raise PydanticCustomError(
                        "unsupported_parameter", "not supported (no tool calling or audio)", {"param": name}
                    )
                del out[name]
        content = out.get("content")
        if isinstance(content, list):
            for i, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise PydanticCustomError(
                        "unsupported_parameter",
                        "content parts of type '{kind}' are not supported (text only)",
                        {"param": f"content.{i}.type", "kind": kind},
                    )
        return out

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Generation):
    endpoint: ClassVar[Endpoint] = "chat"

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: TokenCount | None = None
    safety_identifier: str | None = Field(default=None, description="Metadata, as user.")
    prompt_cache_key: str | None = Field(default=None, description="A caching hint; no effect on the answer.")
    metadata: dict[str, str] | None = Field(default=None, max_length=16, description="Metadata; nothing is stored.")
    service_tier: Literal["auto", "default"] | None = Field(default=None, description="There is one tier.")
    parallel_tool_calls: bool | None = Field(default=None, description="No effect: tools are refused.")

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Generation):
    endpoint: ClassVar[Endpoint] = "completion"

    # Batched prompts are rare in practice; one keeps streaming semantics simple.
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] = Field(
        description="One prompt: a string, or a list of one string."
    )

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def token_budget(self) -> int | None:
        return self.max_tokens


EmbeddingInput = str | list[int]
_Text = Annotated[str, Field(min_length=1)]
_TokenIds = Annotated[list[Annotated[int, Field(ge=0), _WHOLE]], Field(min_length=1)]


class EmbeddingRequest(_Body):
    endpoint: ClassVar[Endpoint] = "embedding"

    input: (
        _Text
        | Annotated[list[_Text], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
        | _TokenIds
        | Annotated[list[_TokenIds], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    ) = Field(description="A string, a list of strings, a list of token ids, or a list of token-id lists.")
    # The openai SDK asks for base64 by default: little-endian float32, base64-encoded, as OpenAI sends.
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1), _WHOLE] | None = Field(
        default=None, description="Only the model's native dimension: the models are not Matryoshka-trained."
    )

    def inputs(self) -> list[EmbeddingInput]:
        return _inputs(self.input)


def _inputs(v: str | list[str] | list[int] | list[list[int]]) -> list[EmbeddingInput]:
    if isinstance(v, str):
        return [v]
    if v and all(isinstance(i, int) for i in v):
        return [[int(i) for i in v]]  # type: ignore[arg-type]
    return list(v)  # type: ignore[arg-type]

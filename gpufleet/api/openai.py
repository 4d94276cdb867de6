"""Request bodies of the OpenAI-compatible endpoints, validated once at the edge.

Both the pod server and the router parse these: the router needs ``model`` and
``exclusive_gpu`` to route, the pod server everything else.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TOKENS_LIMIT = 4096
MAX_CHOICES = 16


class _Body(BaseModel):
    # Clients send fields we do not implement (user, seed, logit_bias...); accept and ignore them
    # as OpenAI-compatible servers commonly do, rather than failing working client code.
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
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
            "Id of an exclusive lease (POST /api/leases on the router; or header x-gpufleet-lease): the request "
            "runs only on the lease's devices, which serve nobody else. The router consumes it; pod servers refuse it."
        ),
    )


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Generation(_Body):
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES, description="Choices to generate for the prompt.")

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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def wants_logprobs(self) -> str | None:
        """The logprobs field a request sets, by name (refused: the engine returns none yet)."""
        if self.logprobs:
            return "logprobs"
        return "top_logprobs" if self.top_logprobs else None


class CompletionRequest(_Generation):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=5)

    def wants_logprobs(self) -> str | None:
        return "logprobs" if self.logprobs is not None else None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        # Batched prompts are rare in practice; one keeps streaming semantics simple.
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return v

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def token_budget(self) -> int | None:
        return self.max_tokens


class EmbeddingRequest(_Body):
    input: str | list[str] = Field()
    # The openai SDK asks for base64 by default: little-endian float32, base64-encoded, as OpenAI sends.
    encoding_format: Literal["float", "base64"] = "float"

    @field_validator("input")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items:
            raise ValueError("input must not be empty")
        if len(items) > 256:
            raise ValueError("at most 256 inputs per request")
        if any(not isinstance(i, str) or not i for i in items):
            raise ValueError("every input must be a non-empty string")
        return v

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

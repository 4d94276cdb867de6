"""Validate: an OpenAI request body becomes a plan the engine can run, or a 4xx naming the field.

Everything a request can be refused for is checked here, before it takes a queue slot or
triggers a group switch: the model and its task, the prompt against the context (tokenised off
the event loop), the token budget, fields we do not serve. The model's group is resolved once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from gpufleet.api.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound
from gpufleet.api.model_groups import ModelGroupsFile, ModelSpec
from gpufleet.api.openai import ChatCompletionRequest, ChatMessage, CompletionRequest, EmbeddingInput, EmbeddingRequest
from gpufleet.pod_server.engine.batching import SamplingParams
from gpufleet.pod_server.tokenizers import ModelInfo, TokenizerCache

Kind = Literal["chat", "completion"]


@dataclass(frozen=True)
class GenerationPlan:
    kind: Kind
    spec: ModelSpec
    group: str
    info: ModelInfo
    prompt_ids: list[int]
    params: SamplingParams
    stop: tuple[str, ...]
    n: int
    stream: bool
    include_usage: bool
    exclusive: str | None

    def choice_params(self, index: int) -> SamplingParams:
        """Choice ``index`` of n: its own seed, so n seeded choices differ from each other yet reproduce."""
        if index == 0 or self.params.seed is None:
            return self.params
        return dataclasses.replace(self.params, seed=self.params.seed + index)


@dataclass(frozen=True)
class EmbeddingPlan:
    spec: ModelSpec
    group: str
    texts: list[EmbeddingInput]
    exclusive: str | None
    encoding: str = "float"


class Validator:
    def __init__(self, groups: ModelGroupsFile, tokenizers: TokenizerCache, max_tokens_default: int) -> None:
        self.groups = groups
        self.tokenizers = tokenizers
        self.max_tokens_default = max_tokens_default

    def model(self, model_id: str, tasks: tuple[str, ...], endpoint: str) -> tuple[ModelSpec, str]:
        group = self.groups.group_of(model_id)
        spec = self.groups.model(model_id)
        if group is None or spec is None:
            raise ModelNotFound(f"model {model_id!r} does not exist", param="model")
        if spec.task not in tasks:
            raise InvalidRequest(
                f"model {model_id!r} is a {spec.task} model and cannot serve {endpoint}",
                param="model",
                code="model_task_mismatch",
            )
        return spec, group

    async def chat(self, req: ChatCompletionRequest) -> GenerationPlan:
        spec, group = self.model(req.model, ("chat", "completion"), "/v1/chat/completions")
        _refuse_lease(req)
        messages = [_message(m) for m in req.messages]
        ids = await self.tokenizers.encode_chat(spec, messages)
        return await self._plan("chat", spec, group, ids, req, "messages")

    async def completion(self, req: CompletionRequest) -> GenerationPlan:
        spec, group = self.model(req.model, ("chat", "completion"), "/v1/completions")
        _refuse_lease(req)
        ids = await self.tokenizers.encode(spec, req.prompt_text())
        return await self._plan("completion", spec, group, ids, req, "prompt")

    async def embeddings(self, req: EmbeddingRequest) -> EmbeddingPlan:
        spec, group = self.model(req.model, ("embedding",), "/v1/embeddings")
        _refuse_lease(req)
        inputs = req.inputs()
        if req.dimensions is not None or any(isinstance(i, list) for i in inputs):
            info = await self.tokenizers.info(spec)
            if req.dimensions is not None and req.dimensions != info.hidden_size:
                raise InvalidRequest(
                    f"dimensions: model {spec.id!r} gives {info.hidden_size} dimensions only (it is not trained "
                    "to be truncated)",
                    param="dimensions",
                    code="unsupported_parameter",
                )
            for i, item in enumerate(inputs):
                if isinstance(item, list) and max(item) >= info.vocab_size:
                    raise InvalidRequest(
                        f"input: token id {max(item)} of input {i} is outside the vocabulary of model {spec.id!r} "
                        f"({info.vocab_size} tokens)",
                        param="input",
                    )
        return EmbeddingPlan(spec, group, inputs, req.exclusive_gpu, req.encoding_format)

    async def _plan(
        self,
        kind: Kind,
        spec: ModelSpec,
        group: str,
        prompt_ids: list[int],
        req: ChatCompletionRequest | CompletionRequest,
        prompt_param: str,
    ) -> GenerationPlan:
        info = await self.tokenizers.info(spec)
        if not prompt_ids:
            # An empty prompt starts from the start-of-text token, as OpenAI does; the engine
            # cannot run a sequence of no tokens.
            start = info.tokenizer.bos_token_id if info.tokenizer.bos_token_id is not None else info.eos_ids[:1]
            if start == ():
                raise InvalidRequest(f"{prompt_param}: must not be empty", param=prompt_param)
            prompt_ids = [start] if isinstance(start, int) else list(start)
        context = info.context_length
        if len(prompt_ids) >= context:
            raise ContextLengthExceeded(
                f"prompt is {len(prompt_ids)} tokens; model {spec.id!r} has a context of {context} tokens",
                param=prompt_param,
            )
        room = context - len(prompt_ids)
        budget = req.token_budget()
        if budget is not None and budget > room:
            raise ContextLengthExceeded(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({budget}) exceeds the context of "
                f"{context} tokens of model {spec.id!r}",
                param="max_tokens",
            )
        if budget is not None and req.min_tokens > budget:
            chat_budget = isinstance(req, ChatCompletionRequest) and req.max_completion_tokens
            name = "max_completion_tokens" if chat_budget else "max_tokens"
            raise InvalidRequest(
                f"min_tokens ({req.min_tokens}) must not exceed {name} ({budget})", param="min_tokens"
            )
        if budget is None and req.min_tokens > room:
            raise ContextLengthExceeded(
                f"prompt ({len(prompt_ids)} tokens) plus min_tokens ({req.min_tokens}) exceeds the context of "
                f"{context} tokens of model {spec.id!r}",
                param="min_tokens",
            )
        # Without max_tokens the default budget applies, raised to min_tokens where that asks for more.
        default = max(min(self.max_tokens_default, room), req.min_tokens)
        params = SamplingParams(
            max_new_tokens=budget if budget is not None else default,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
        )
        return GenerationPlan(
            kind=kind,
            spec=spec,
            group=group,
            info=info,
            prompt_ids=prompt_ids,
            params=params,
            stop=tuple(req.stop_sequences()),
            n=req.n,
            stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            exclusive=req.exclusive_gpu,
        )


def _message(m: ChatMessage) -> dict[str, str]:
    doc = {"role": m.role, "content": m.text()}
    if m.name is not None:
        doc["name"] = m.name  # templates that know speakers use it
    return doc


def _refuse_lease(req: ChatCompletionRequest | CompletionRequest | EmbeddingRequest) -> None:
    # The router consumes leases and never forwards them: one reaching a pod was sent to it directly.
    if req.lease is not None:
        raise InvalidRequest(
            "lease: exclusive leases are taken and honoured by the router (POST /api/leases there); "
            "a pod server serves no leases",
            param="lease",
            code="unsupported_parameter",
        )

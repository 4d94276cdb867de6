"""Per-request seeds and greedy decoding inside transformers' continuous batching.

The library's manager samples every sequence of a batch from one global generator, and its
``do_sample`` is global too, so a request's ``seed`` would not reproduce its text and
``temperature: 0`` has no per-request meaning. This logits processor fills that gap through the
library's own processor interface (no fork): it runs after the library's per-request
temperature and top-p warpers and, for each row, draws the token itself from a uniform number
derived from (request seed, position), or takes the argmax for greedy rows, then turns the
row into a one-hot so the library's own sampling step picks exactly that token. Unseeded
requests get a random seed, so every row is decided here and batch composition never changes
which token a seeded request gets.

``min_tokens`` (vLLM's extension) is a second processor of the same interface, first in the list:
while a row has fewer generated tokens than its request's ``min_tokens``, its end tokens get a
logit of -inf, so the warpers and the sampler never see them (vLLM masks them the same way).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
)

GREEDY = -2  # the row's key for argmax decoding
KEY_KWARG = "gpufleet_sampling_key"  # the request's seed (>= 0) or GREEDY
MIN_TOKENS_KWARG = "gpufleet_min_tokens"  # no end token before this many generated tokens
_MASK31 = (1 << 31) - 1


def draw_key(seed: int, position: int) -> int:
    """A 31-bit integer from (seed, position): splitmix64, so neighbouring positions are unrelated."""
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & _MASK31


class SeededSampler(ContinuousBatchingLogitsProcessor):
    supported_kwargs: dict[str, type] = {KEY_KWARG: int}
    ignored_kwargs: tuple[str, ...] = ()

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(GREEDY)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        keys = []
        for request in requests_with_new_token:
            state = request.state
            seed = int(state.logit_processor_kwargs.get(KEY_KWARG, GREEDY))
            keys.append(GREEDY if seed < 0 else draw_key(seed, state.generated_len()))
        return torch.tensor(keys, dtype=torch.int32, device="cpu")

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        keys = tensor_arg[: scores.size(0)]
        probs = scores.float().softmax(dim=-1)
        cdf = probs.cumsum(dim=-1)
        u = (keys.clamp(min=0).to(torch.float64) + 0.5) / float(1 << 31)
        u = u.to(cdf.dtype).unsqueeze(-1) * cdf[:, -1:]  # cdf[-1] is ~1; scaling keeps u inside it
        sampled = torch.searchsorted(cdf, u).clamp(max=scores.size(-1) - 1)
        greedy = scores.argmax(dim=-1, keepdim=True)
        token = torch.where((keys == GREEDY).unsqueeze(-1), greedy, sampled)
        one_hot = torch.full_like(scores, float("-inf")).scatter(-1, token, 0.0)
        return one_hot


class MinTokensMask(ContinuousBatchingLogitsProcessor):
    """-inf on the end tokens of each row whose sequence has fewer than its ``min_tokens`` tokens."""

    supported_kwargs: dict[str, type] = {MIN_TOKENS_KWARG: int}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self, eos_ids: Sequence[int]) -> None:
        self._eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long)
        self._eos_on: dict[torch.device, torch.Tensor] = {}

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        masked = []
        for request in requests_with_new_token:
            state = request.state
            floor = int(state.logit_processor_kwargs.get(MIN_TOKENS_KWARG, 0))
            masked.append(1 if state.generated_len() < floor else 0)
        return torch.tensor(masked, dtype=torch.int32, device="cpu")

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        eos = self._eos_on.get(scores.device)
        if eos is None:
            eos = self._eos_on[scores.device] = self._eos.to(scores.device)
        rows = (tensor_arg[: scores.size(0)] != 0).unsqueeze(-1)
        scores[:, eos] = scores[:, eos].masked_fill(rows, float("-inf"))
        return scores


def install(processor_list: Any, eos_ids: Sequence[int] = ()) -> None:
    """Add the min-tokens mask (first: before the warpers) and the sampler (last) to a manager's
    ``ContinuousBatchingLogitsProcessorList`` (before ``start``)."""
    if eos_ids:
        processor_list.logits_processor.insert(0, MinTokensMask(eos_ids))
        processor_list.tensors_required += 1
    processor_list.logits_processor.append(SeededSampler())
    processor_list.tensors_required += 1
    processor_list.do_processing = True
    processor_list._retrieve_processors_kwargs()

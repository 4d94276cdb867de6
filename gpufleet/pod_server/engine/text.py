"""Generated token ids to client-visible text: incremental detokenisation, stop strings, EOS ids.

Pure Python over a tokenizer object; no torch. The engine feeds each sequence's new token ids to its
own :class:`TextAssembler` and sends whatever text the returned :class:`Piece` releases.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


@dataclass(frozen=True, slots=True)
class Piece:
    """What one :meth:`TextAssembler.push` releases.

    ``text``: new text that is safe to send now. ``finished``: ``"stop"`` once a stop string or an EOS
    id was seen, else ``None``. ``tokens``: generated tokens consumed by this push.
    """

    text: str
    finished: str | None
    tokens: int


class TextAssembler:
    """Turns one sequence's generated token ids into the text a client may see, incrementally.

    Detokenisation uses ``tokenizers``' :class:`DecodeStream`, O(1) per token: no decode of the whole
    text per token, and a character whose UTF-8 bytes span several tokens is released only once it
    is complete (never a U+FFFD in the middle of the text).

    Stop strings are held back until they can no longer match: while the text so far ends with a
    proper prefix of a stop string (``"##"`` with the stop ``"###"``), that suffix is not released.
    When a stop string appears, the text ends right before it and everything after is dropped.
    With ``min_tokens`` (vLLM's extension, as vLLM does it), stop strings are looked for only from the
    token that makes ``min_tokens`` tokens: the text of the tokens before it is released as it comes.

    Token accounting follows OpenAI's usage: every generated token counts, including the EOS token
    and the token that completes a stop string. Tokens pushed after the one that finished the
    sequence (in the same push or a later one) are not consumed and not counted.
    """

    def __init__(
        self, tokenizer: Any, stop: Sequence[str], eos_ids: Collection[int], *, min_tokens: int = 0
    ) -> None:
        self._backend = _backend_of(tokenizer)
        self._min_tokens = min_tokens
        self._seen = 0  # tokens consumed so far
        self._stream = DecodeStream(skip_special_tokens=True)
        self._stops = tuple(dict.fromkeys(s for s in stop if s))  # "" would match everywhere
        self._eos = frozenset(eos_ids)
        self._held = ""  # decoded text not released yet: a suffix that may start a stop string
        # Ids the stream has taken without releasing text (part of a multi-byte character); decoded
        # with replacement characters only if generation ends on them, as a whole decode would.
        self._undecoded: list[int] = []
        self._finished: str | None = None

    @property
    def finished(self) -> str | None:
        return self._finished

    def push(self, token_ids: Sequence[int]) -> Piece:
        """Consume newly generated ids; see :class:`Piece`."""
        if self._finished is not None:
            return Piece("", self._finished, 0)
        released: list[str] = []
        consumed = 0
        for token_id in token_ids:
            consumed += 1
            self._seen += 1
            if token_id in self._eos:
                released.append(self._release_all())
                self._finished = "stop"
                break
            chunk = self._stream.step(self._backend, token_id)
            if chunk is None:
                self._undecoded.append(token_id)
                continue
            self._undecoded.clear()
            if self._seen < self._min_tokens:  # too early for a stop string: release as it comes
                released.append(self._held + chunk)
                self._held = ""
                continue
            out, stopped = self._add(chunk)
            released.append(out)
            if stopped:
                self._finished = "stop"
                break
        return Piece("".join(released), self._finished, consumed)

    def flush(self) -> str:
        """End of generation without a stop (length limit): release whatever was held back."""
        if self._finished is not None:
            return ""
        return self._release_all()

    def _add(self, chunk: str) -> tuple[str, bool]:
        """Append decoded text; return the part safe to release and whether a stop string matched."""
        text = self._held + chunk
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        keep = _held_suffix_len(text, self._stops)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def _release_all(self) -> str:
        tail = self._backend.decode(self._undecoded, skip_special_tokens=True) if self._undecoded else ""
        self._undecoded.clear()
        text = self._held + tail
        self._held = ""
        return text


def _held_suffix_len(text: str, stops: Iterable[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def _backend_of(tokenizer: Any) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    for attr in ("backend_tokenizer", "_tokenizer"):
        backend = getattr(tokenizer, attr, None)
        if isinstance(backend, Tokenizer):
            return backend
    raise TypeError(f"a fast tokenizer (backed by the tokenizers library) is needed, got {type(tokenizer).__name__}")


def eos_token_ids(model_config: Any, generation_config: Any | None, tokenizer: Any) -> list[int]:
    """Every id that ends generation: generation_config's ``eos_token_id`` (int or list), the model
    config's, and the tokenizer's, deduplicated in that order, ignoring ``None``.

    Models such as Llama-3-Instruct name their end-of-turn token only in ``generation_config``."""
    ids: dict[int, None] = {}
    for source in (generation_config, model_config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            if v is not None:
                ids.setdefault(int(v), None)
    return list(ids)

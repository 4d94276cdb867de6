"""Continuous batching for one generative model on one device, on transformers' own manager.

``ContinuousBatchingManager`` (paged KV cache, per-request temperature/top-p, cancellation) runs
its step loop on a background thread; this wrapper sizes its cache explicitly, adds what the
library lacks around it (per-request seeds, greedy rows and ``min_tokens``: ``sampling``;
``ignore_eos`` is the library's own per-request end-token set, left empty; the end of a cancelled
request, which the library never reports), and turns each request into an async iterator of token
steps whose closing cancels the sequence and frees its KV blocks at once.

If the library's step thread dies (a fatal error in a step), its requests fail with the error,
requests that were waiting on it fail within ``LIVENESS_CHECK_S``, and the next request starts a
fresh manager: one failure costs the requests in flight, not the device.

Created when a group becomes current on a device, stopped (cache freed) before it is parked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from gpufleet.api.errors import Unavailable
from gpufleet.pod_server.devices import is_cuda, torch_device
from gpufleet.pod_server.engine import sampling
from gpufleet.pod_server.engine.cpu_linear import PackedLinears
from gpufleet.pod_server.engine.kv_sizing import KvSizing

log = logging.getLogger(__name__)

# A temperature/top-p the manager's base config must hold so that it builds its per-request
# warpers at all (it skips a warper whose default is a no-op); each request sends its own values.
_BASE_TEMPERATURE = 0.5
_BASE_TOP_P = 0.5
# How often a request waiting for tokens checks that the step thread is still alive.
LIVENESS_CHECK_S = 1.0


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    # vLLM's extensions: never stop at an end token; no end token before ``min_tokens`` tokens.
    ignore_eos: bool = False
    min_tokens: int = 0


@dataclass(frozen=True)
class Step:
    """New tokens of one sequence; ``finished`` is "stop" (an end token) or "length" on the last step."""

    token_ids: list[int]
    finished: str | None = None


class EngineError(Unavailable):
    """The batching loop failed a request (its error is the library's)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="generation_failed", retry_after_s=1)


# Every manager this process started and has not seen stopped: its step thread is not a daemon, so one
# left running (an engine whose stop was never reached) would keep the process from exiting.
_MANAGERS: weakref.WeakSet[Any] = weakref.WeakSet()


def stop_every_manager(timeout_s: float = 5.0) -> int:
    """Stop the step loop of every manager still running (at process end); returns how many were."""
    running = [m for m in list(_MANAGERS) if m.is_running()]
    for manager in running:
        manager.stop(block=True, timeout=timeout_s, hard_stop=True)
    return len(running)


class BatchEngine:
    def __init__(
        self,
        model_id: str,
        model: Any,
        device: str,
        sizing: KvSizing,
        *,
        max_sequences: int,
        eos_ids: Sequence[int],
        on_tokens: Callable[[int], None] = lambda n: None,
        packed_linear: bool = False,
    ) -> None:
        """``packed_linear``: on a CPU device, the model's linear layers run on oneDNN's packed weights
        while this engine runs (``cpu_linear``)."""
        self.model_id = model_id
        self.device = device
        self.sizing = sizing
        self.max_sequences = max_sequences
        self.eos_ids = sorted(set(eos_ids))
        self._on_tokens = on_tokens  # every generated token, delivered or not (metrics)
        self.running = 0
        self.restarts = 0  # managers started again after their step thread died
        self._closed = False
        self._generation = GenerationConfig(
            do_sample=True,
            temperature=_BASE_TEMPERATURE,
            top_p=_BASE_TOP_P,
            top_k=0,
            max_new_tokens=64,
            eos_token_id=self.eos_ids or -1,
            pad_token_id=self.eos_ids[0] if self.eos_ids else 0,
        )
        self._fields = manager_fields(device, sizing, max_sequences)
        self._config = _cb_config(**self._fields)
        self._model = model
        self._packed_linear = packed_linear and not is_cuda(device)
        self._packed: PackedLinears | None = None
        self._manager = self._new_manager()

    def _new_manager(self) -> Any:
        with _on_device(self.device):
            try:
                manager = self._model.init_continuous_batching(
                    generation_config=self._generation, continuous_batching_config=self._config
                )
            except Exception as exc:
                if not self._fields.get("auto_switch_to_flash"):
                    raise
                # A flash kernel the library found but cannot load (an offline hub kernel, another
                # CUDA build): the attention the model was loaded with, as on a CPU.
                log.warning(
                    "flash attention unavailable; keeping the model's attention",
                    extra={"model": self.model_id, "device": self.device, "error": repr(exc)},
                )
                self._fields = {**self._fields, "auto_switch_to_flash": False}
                self._config = _cb_config(**self._fields)
                manager = self._model.init_continuous_batching(
                    generation_config=self._generation, continuous_batching_config=self._config
                )
        sampling.install(manager.logit_processor, self.eos_ids)
        _MANAGERS.add(manager)
        return manager

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._packed_linear and self._packed is None:
            self._packed = PackedLinears(self._model, self.max_sequences)
        with _on_device(self.device), torch.inference_mode():
            self._manager.start()
        log.info(
            "batching engine started",
            extra={
                "model": self.model_id,
                "device": self.device,
                "kv_blocks": self.sizing.num_blocks,
                "page_size": self.sizing.page_size,
                "kv_mbytes": round(self.sizing.bytes / 1e6, 3),
                "max_sequences": self.max_sequences,
                "packed_linear_layers": len(self._packed.modules) if self._packed else 0,
            },
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the step loop and free the KV cache (blocking: call off the event loop)."""
        self._closed = True
        if self._manager.is_running():
            self._manager.stop(block=True, timeout=timeout_s, hard_stop=True)
        if self._packed is not None:  # after the step thread: no step is running on the packed copies
            self._packed.release()
            self._packed = None

    def kv_usage(self) -> tuple[int, int]:
        """(blocks used, blocks total) of this model's cache."""
        processor = self._manager.batch_processor
        total = self.sizing.num_blocks
        if processor is None:
            return 0, total
        free = float(processor.cache.compute_free_capacity(relative=True))
        return round((1.0 - free) * total), total

    # --- requests ----------------------------------------------------------------------------

    def _revive(self) -> None:
        """A manager whose step thread died takes no more work: start a fresh one in its place."""
        if self._closed:
            raise EngineError(f"the batching engine of {self.model_id} on {self.device} is stopped")
        dead, fatal = self._manager, getattr(self._manager.background_thread_status, "fatal_error", None)
        log.error(
            "batching engine died; starting a new one",
            extra={"model": self.model_id, "device": self.device, "error": repr(fatal), "restarts": self.restarts + 1},
        )
        self._manager = self._new_manager()
        with _on_device(self.device), torch.inference_mode():
            self._manager.start()
        self.restarts += 1
        del dead  # its KV cache goes with it

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Step]:
        """Stream one sequence; leaving the iteration early (a stop string, a client gone) cancels it."""
        if not _alive(self._manager):
            self._revive()
        manager = self._manager  # a revival for a later request must not orphan this one
        request_id = f"{self.model_id}-{uuid.uuid4().hex[:16]}"
        steps: asyncio.Queue[tuple[list[int], Any]] = asyncio.Queue()
        seen = 0

        def on_output(output: Any) -> None:  # on the event loop, batched per step by the library
            nonlocal seen
            new = list(output.generated_tokens[seen:])
            seen = len(output.generated_tokens)
            if new:
                self._on_tokens(len(new))
            steps.put_nowait((new, output))

        greedy = params.temperature <= 1e-5
        seed = params.seed if params.seed is not None else secrets.randbits(31)
        key = sampling.GREEDY if greedy else seed & 0x7FFFFFFF  # the library carries an int32
        # ignore_eos: the library stops on no end token (an empty set) and only max_new_tokens ends it.
        # min_tokens: the end tokens are masked out of the logits until that many tokens exist (as
        # vLLM does, and only where they would end the sequence).
        eos_ids = [] if params.ignore_eos else self.eos_ids
        min_tokens = 0 if params.ignore_eos or not eos_ids else params.min_tokens
        manager.register_result_handler(request_id, on_output)
        manager.add_request(
            list(prompt_ids),
            request_id=request_id,
            max_new_tokens=params.max_new_tokens,
            streaming=True,
            eos_token_id=eos_ids or -1,
            temperature=1.0 if greedy else float(params.temperature),
            top_p=float(params.top_p),
            **{sampling.KEY_KWARG: key},
            **({sampling.MIN_TOKENS_KWARG: int(min_tokens)} if min_tokens else {}),
        )
        self.running += 1
        finished = False
        try:
            while True:
                try:
                    async with asyncio.timeout(LIVENESS_CHECK_S):  # no task per step, unlike wait_for
                        new, output = await steps.get()
                except TimeoutError:
                    if _alive(manager):
                        continue
                    finished = True  # nothing more comes from a dead thread
                    raise EngineError(f"the batching engine on {self.device} stopped mid-request") from None
                if output.error:
                    finished = True
                    raise EngineError(f"generation failed on {self.device}: {output.error}")
                if output.is_finished():
                    finished = True
                    ended_on_eos = bool(output.generated_tokens) and output.generated_tokens[-1] in eos_ids
                    yield Step(new, "stop" if ended_on_eos else "length")
                    return
                if new:
                    yield Step(new)
        finally:
            self.running -= 1
            if not finished:
                manager.cancel_request(request_id)
                _forget_handler(manager, request_id)


def manager_fields(device: str, sizing: KvSizing, max_sequences: int) -> dict[str, Any]:
    """The library manager's settings for one model on ``device`` (pure: the unit tests read them).

    Both device kinds: the KV cache and batch sized by ``kv_sizing``, per-request sampling, and no
    block sharing (requests rarely share prompts here, and the blocks a shared prefix pins would
    count against a budget sized per sequence). On a GPU the rest is the library's documented fast
    path until ``bench/gpu/run.sh`` says otherwise: flash attention for 16-bit models where a kernel
    loads (``auto_switch_to_flash``), CUDA graphs and async double-buffering as the library decides
    (None). On a CPU: the model's own attention, no CUDA graphs, no async batching (the library
    refuses it there), no compile (60x slower on this machine's CPU: bench engine_peer's note)."""
    cuda = is_cuda(device)
    return {
        "page_size": sizing.page_size,
        "num_blocks": sizing.num_blocks,
        "max_batch_tokens": sizing.max_batch_tokens,
        "max_requests_per_batch": max_sequences,
        "per_request_processors": True,
        "allow_block_sharing": False,
        "auto_switch_to_flash": cuda,
        "use_cuda_graph": None if cuda else False,
        "use_async_batching": None if cuda else False,
        "default_compile_level": 0,
    }


def _cb_config(**fields: Any) -> ContinuousBatchingConfig:
    """The config for the installed transformers: 5.17 to 5.23 call the page size ``block_size``."""
    names = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    if "page_size" not in names:
        fields["block_size"] = fields.pop("page_size")
    # Fields older releases lack are left out: before 5.18 the manager never switched attention
    # itself, and compile levels and async batching came with their fields.
    for name in ("auto_switch_to_flash", "default_compile_level", "use_async_batching"):
        if name not in names:
            fields.pop(name, None)
    missing = sorted(set(fields) - names)
    if missing:
        raise RuntimeError(f"this transformers' ContinuousBatchingConfig lacks {missing}: see pyproject's pin")
    return ContinuousBatchingConfig(**fields)


def _alive(manager: Any) -> bool:
    """The step thread runs and has recorded no fatal error (it may take a moment to exit after one)."""
    status = getattr(manager, "background_thread_status", None)
    return bool(manager.is_running()) and getattr(status, "fatal_error", None) is None


def _forget_handler(manager: Any, request_id: str) -> None:
    # A cancelled request never gets a final output, so the library never drops its handler.
    router = getattr(manager, "output_router", None)
    handlers = getattr(router, "result_handlers", None)
    if router is None or handlers is None:
        return
    with router._lock:
        handlers.pop(request_id, None)


class _on_device:
    """``torch.cuda.device(dev)`` on CUDA (the manager sizes and allocates on the current device)."""

    def __init__(self, device: str) -> None:
        self._ctx = torch.cuda.device(torch.device(torch_device(device))) if is_cuda(device) else None

    def __enter__(self) -> None:
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)

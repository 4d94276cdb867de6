"""Load a model's safetensors straight onto its device, skipping ``from_pretrained``'s detours.

``inference.load_model`` builds the model with ``from_pretrained`` (weights in host memory)
and then moves it with ``.to(device)``: on a GPU every byte crosses twice, from pageable
memory. ``fast_load_model`` instead

1. builds the model skeleton on the meta device (no allocation, no random init),
2. reads the safetensors files directly to the target device (``load_file(device=...)``),
   or, with ``staging="pinned"`` on CUDA, through two reusable pinned host buffers with
   asynchronous copies,
3. puts the tensors in place with ``load_state_dict(assign=True)`` (no second copy), and
4. recomputes the non-persistent buffers (rotary frequencies, position ids) on the device
   with the model's own ``_init_weights`` for the modules that own them.

Whenever the checkpoint does not map one to one onto the model (renamed or missing keys,
a module owning both parameters and non-persistent buffers, no local safetensors, remote
code, ``_keep_in_fp32_modules``), it falls back to ``load_model`` and says why in the log,
so the result is always the same model as ``from_pretrained`` gives.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from gpufleet.api.model_groups import ModelSpec
from gpufleet.pod_server.devices import is_cuda, torch_device
from gpufleet.pod_server.inference import LoadedModel, load_model, load_tokenizer, read_into_memory, resolve_dtype

log = logging.getLogger(__name__)

Staging = Literal["direct", "pinned"]


class FastLoadUnsupported(Exception):
    """The checkpoint or model needs from_pretrained's general machinery."""


def safetensors_files(source: str) -> list[Path]:
    """The local safetensors files of a checkpoint folder, shards included."""
    root = Path(source)
    if not root.is_dir():
        raise FastLoadUnsupported(f"{source!r} is not a local folder")
    index = root / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [root / s for s in shards]
    single = root / "model.safetensors"
    if single.exists():
        return [single]
    raise FastLoadUnsupported(f"no safetensors weights in {source!r}")


def _checkpoint_keys(files: list[Path]) -> set[str]:
    keys: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            keys.update(st.keys())
    return keys


def _non_persistent_buffers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    out = []
    for module in model.modules():
        for name in getattr(module, "_non_persistent_buffers_set", ()):
            if module._buffers.get(name) is not None:
                out.append((module, name))
    return out


def _skeleton(spec: ModelSpec, dtype: torch.dtype) -> Any:
    config = AutoConfig.from_pretrained(spec.source)
    if getattr(config, "auto_map", None):
        raise FastLoadUnsupported("remote code")
    cls = AutoModel if spec.task == "embedding" else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    if getattr(model, "_keep_in_fp32_modules", None):
        raise FastLoadUnsupported("model keeps some modules in float32")
    return model


def _plan(model: Any, files: list[Path]) -> tuple[dict[str, str], set[str]]:
    """Map checkpoint keys onto model keys; returns (checkpoint key -> model key, tied model keys)."""
    expected = set(model.state_dict().keys())
    found = _checkpoint_keys(files)
    buffers = {f"{n}" for n, _ in model.named_buffers()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    mapping: dict[str, str] = {}
    for key in found:
        if key in expected:
            mapping[key] = key
        elif prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in expected:
            mapping[key] = key[len(prefix) + 1 :]
        elif key in buffers or key.split(".")[-1] in ("position_ids", "inv_freq"):
            continue  # an old checkpoint's copy of a buffer we recompute
        else:
            raise FastLoadUnsupported(f"checkpoint key {key!r} has no place in the model")
    missing = expected - set(mapping.values())
    tied: set[str] = set()
    if missing and getattr(model.config, "tie_word_embeddings", False):
        out_emb = model.get_output_embeddings()
        if out_emb is not None:
            tied = {n for n, p in model.named_parameters(remove_duplicate=False) if p is out_emb.weight} & missing
    if missing - tied:
        raise FastLoadUnsupported(f"checkpoint lacks {len(missing - tied)} weights, e.g. {sorted(missing - tied)[0]!r}")
    return mapping, tied


def _load_direct(files: list[Path], device: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f), device=device))
    return state


def _load_pinned(files: list[Path], device: str, chunk_bytes: int = 64 << 20) -> dict[str, torch.Tensor]:
    """Copy every tensor to ``device`` through two pinned host buffers, overlapping the host-side
    copy of one chunk with the transfer of the other."""
    target = torch.device(device)
    stream = torch.cuda.Stream(device=target)
    bufs = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    done: list[torch.cuda.Event | None] = [None, None]
    state: dict[str, torch.Tensor] = {}
    turn = 0
    with torch.cuda.device(target), torch.cuda.stream(stream):
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in st.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    src = st.get_tensor(name).contiguous()
                    dst = torch.empty(src.shape, dtype=src.dtype, device=target)
                    src_b = src.reshape(-1).view(torch.uint8)
                    dst_b = dst.reshape(-1).view(torch.uint8)
                    for start in range(0, src_b.numel(), chunk_bytes):
                        n = min(chunk_bytes, src_b.numel() - start)
                        ev = done[turn]
                        if ev is not None:
                            ev.synchronize()  # the previous transfer out of this buffer has finished
                        bufs[turn][:n].copy_(src_b[start : start + n])
                        dst_b[start : start + n].copy_(bufs[turn][:n], non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record(stream)
                        done[turn] = ev
                        turn ^= 1
                    state[name] = dst
        stream.synchronize()
    return state


def _fast(spec: ModelSpec, device: str, staging: Staging, tokenizer: Any = None) -> LoadedModel:
    dtype = resolve_dtype(spec, device)
    files = safetensors_files(spec.source)
    model = _skeleton(spec, dtype)
    mapping, tied = _plan(model, files)
    owners = _non_persistent_buffers(model)
    for module, _ in owners:
        if any(p is not None for p in module._parameters.values()):
            raise FastLoadUnsupported(f"{type(module).__name__} owns parameters and non-persistent buffers")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    dev = torch_device(device)
    raw = _load_pinned(files, dev) if staging == "pinned" and is_cuda(device) else _load_direct(files, dev)
    meta_state = model.state_dict()
    state = {}
    for key, model_key in mapping.items():
        t = raw.pop(key)
        want = meta_state[model_key].dtype
        state[model_key] = t if t.dtype == want else t.to(want)
    del raw
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    with torch.no_grad():
        for module, name in owners:
            buf = module._buffers[name]
            assert buf is not None
            module._buffers[name] = torch.empty_like(buf, device=dev)
        for module in {id(m): m for m, _ in owners}.values():
            model._init_weights(module)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if leftovers:
        raise FastLoadUnsupported(f"{len(leftovers)} tensors left on meta, e.g. {leftovers[0]!r}")
    if not is_cuda(device):
        read_into_memory(model)  # safe_open maps the files on a CPU: read them now, not at the first request
    model.eval()
    return LoadedModel(spec, model, tokenizer, device)


def fast_load_model(
    spec: ModelSpec, device: str, *, staging: Staging = "direct", tokenizer: Any = None
) -> LoadedModel:
    """Same contract as ``inference.load_model``: one model of ``spec`` resident on ``device``."""
    started = time.perf_counter()
    try:
        loaded = _fast(spec, device, staging, tokenizer)
    except FastLoadUnsupported as exc:
        log.info("fast load not applicable, using from_pretrained", extra={"model": spec.id, "reason": str(exc)})
        return load_model(spec, device, tokenizer=tokenizer)
    log.info(
        "model loaded",
        extra={
            "model": spec.id,
            "device": device,
            "path": f"fast-{staging}",
            "seconds": round(time.perf_counter() - started, 3),
            "mbytes": round(loaded.bytes / 1e6, 2),
        },
    )
    return loaded


LoadMethod = Literal["auto", "fast", "from_pretrained"]


def select_loader(method: LoadMethod, tokenizers: Callable[[ModelSpec], Any] | None = None) -> Any:
    """The loader for the LOAD_METHOD setting; ``tokenizers`` gives a model's one tokenizer (the
    pod's ``TokenizerCache.tokenizer``), else each load reads its own.

    ``auto`` uses the fast path on CUDA devices, where it saves a full host-side copy of the
    weights, and ``from_pretrained`` on CPU devices, where reading cold files was measured
    faster that way (bench/results/switch_cost.json)."""

    def load(spec: ModelSpec, device: str) -> LoadedModel:
        tokenizer = tokenizers(spec) if tokenizers is not None else None
        if method == "fast" or (method == "auto" and is_cuda(device)):
            return fast_load_model(spec, device, tokenizer=tokenizer)
        return load_model(spec, device, tokenizer=tokenizer)

    return load

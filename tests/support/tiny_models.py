"""Tiny models saved with ``save_pretrained`` for tests that need a particular shape of model folder."""

from __future__ import annotations

from pathlib import Path

# What the model from save_tiny_llama_with_end_token answers, then its end token.
TINY_LLAMA_REPLY = " quick brown fox"


def save_tiny_llama_with_end_token(dir: Path, tokenizer_dir: Path) -> tuple[Path, int]:
    """Save a one-layer Llama (hidden size 16) whose ``generation_config.json`` names an end token
    the tokenizer does not treat as EOS; return the model folder and that end token's id.

    The weights are set, not random, so generation is deterministic at any sane temperature: the
    layer adds nothing to the residual stream, so the next token depends only on the current one.
    After any token outside the reply it emits the tokens of :data:`TINY_LLAMA_REPLY`, then the end
    token, then the reply again. A server that honours generation_config stops with exactly the
    reply text; one that knows only the tokenizer's EOS runs on to its length limit.
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    chain = list(tokenizer(TINY_LLAMA_REPLY, add_special_tokens=False)["input_ids"])
    special = set(tokenizer.all_special_ids)
    end_id = next(i for i in range(len(tokenizer)) if i not in special and i not in chain)
    hidden = 16
    if len(set(chain)) != len(chain) or len(chain) + 1 > hidden or tokenizer.decode(chain) != TINY_LLAMA_REPLY:
        raise ValueError(f"the tokenizer in {tokenizer_dir} does not fit the tiny Llama: {chain}")

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    scale = 50.0  # logit of the intended next token (times the RMSNorm gain of a one-hot, 4); others get 0
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        head = model.lm_head.weight
        embed.zero_()
        head.zero_()
        embed[:, 0] = 1.0  # every token outside the reply: "state 0"
        for i, token in enumerate(chain):
            embed[token] = 0.0
            embed[token, i + 1] = 1.0  # after reply token i: state i + 1
        head[chain[0], 0] = scale  # state 0 -> the reply's first token
        for i, token in enumerate(chain[1:], start=1):
            head[token, i] = scale
        head[end_id, len(chain)] = scale  # after the last reply token: the end token
    path = Path(dir)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    GenerationConfig(  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[end_id, tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(path)
    return path, end_id

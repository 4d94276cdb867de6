"""Generated ids to client text: stop strings never leak, EOS ids from every config, no broken characters."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gpufleet.pod_server.engine.text import Piece, TextAssembler, eos_token_ids
from tests.support.tiny_models import TINY_LLAMA_REPLY, save_tiny_llama_with_end_token

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenizer(demo_models: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_models.parent / "tiny-chat")


def ids_of(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def one_by_one(assembler: TextAssembler, ids: Sequence[int]) -> list[Piece]:
    return [assembler.push([i]) for i in ids]


def test_text_is_released_token_by_token_when_no_stop_can_match(tokenizer: Any) -> None:
    ids = ids_of(tokenizer, "The quick brown fox")
    pieces = one_by_one(TextAssembler(tokenizer, [], [tokenizer.eos_token_id]), ids)
    assert [p.text for p in pieces] == [tokenizer.decode([i]) for i in ids]
    assert all(p.finished is None and p.tokens == 1 for p in pieces)


def test_a_prefix_of_a_stop_string_is_held_then_released_when_it_cannot_match(tokenizer: Any) -> None:
    ids = ids_of(tokenizer, "a ## b")
    assert len(ids) >= 4  # "#" tokens arrive one at a time
    assembler = TextAssembler(tokenizer, ["###"], [])
    sent = ""
    for i in ids:
        piece = assembler.push([i])
        sent += piece.text
        assert "#" not in sent or " b" in sent, f"released {sent!r} before it was known not to be a stop"
    assert sent == "a ## b"
    assert assembler.flush() == ""


def test_a_stop_string_across_token_boundaries_never_leaks_a_prefix(tokenizer: Any) -> None:
    ids = ids_of(tokenizer, "fox ### lazy dog")
    assembler = TextAssembler(tokenizer, ["###"], [])
    pieces = one_by_one(assembler, ids[: len(ids_of(tokenizer, "fox ###"))])
    sent = "".join(p.text for p in pieces)
    assert sent == "fox "
    assert pieces[-1].finished == "stop"
    assert [p.finished for p in pieces[:-1]] == [None] * (len(pieces) - 1)
    # Whatever comes after the stop is dropped and not consumed.
    assert assembler.push(ids[len(pieces) :]) == Piece("", "stop", 0)
    assert assembler.flush() == ""


def test_everything_after_a_stop_in_the_same_push_is_dropped(tokenizer: Any) -> None:
    ids = ids_of(tokenizer, "Hello! How can I help you today?")
    through_stop = len(ids_of(tokenizer, "Hello! How"))
    piece = TextAssembler(tokenizer, [" How"], []).push(ids)
    assert piece == Piece("Hello!", "stop", through_stop)


def test_the_earliest_of_several_stop_strings_wins(tokenizer: Any) -> None:
    ids = ids_of(tokenizer, "brown fox jumps over the lazy dog")
    assembler = TextAssembler(tokenizer, ["lazy", "jumps", "zzz"], [])
    sent = "".join(p.text for p in one_by_one(assembler, ids))
    assert sent == "brown fox "
    assert assembler.finished == "stop"


def test_a_longer_stop_sharing_a_prefix_with_a_shorter_one(tokenizer: Any) -> None:
    # "##" is held for "###"; when "#!" arrives, the stop "#!" matches at the second "#".
    assembler = TextAssembler(tokenizer, ["###", "#!"], [])
    sent = "".join(p.text for p in one_by_one(assembler, ids_of(tokenizer, "x ##! y")))
    assert sent == "x #"
    assert assembler.finished == "stop"


def test_a_stop_string_at_the_very_start_releases_nothing(tokenizer: Any) -> None:
    ids = ids_of(tokenizer, "### The quick")
    assembler = TextAssembler(tokenizer, ["###"], [])
    pieces = one_by_one(assembler, ids[:3])
    assert [p.text for p in pieces] == ["", "", ""]
    assert pieces[-1].finished == "stop"


def test_an_eos_id_ends_with_stop_and_is_counted(tokenizer: Any) -> None:
    eos = tokenizer.eos_token_id
    ids = ids_of(tokenizer, "Hello")
    assembler = TextAssembler(tokenizer, [], [eos])
    piece = assembler.push([*ids, eos, *ids])
    assert piece == Piece("Hello", "stop", len(ids) + 1)
    assert assembler.flush() == ""


def test_an_eos_id_releases_text_held_for_a_stop_that_did_not_complete(tokenizer: Any) -> None:
    eos = tokenizer.eos_token_id
    assembler = TextAssembler(tokenizer, ["###"], [eos])
    held = assembler.push(ids_of(tokenizer, "fox ##"))
    assert held.text == "fox " and held.finished is None
    assert assembler.push([eos]) == Piece("##", "stop", 1)


def test_any_listed_eos_id_stops_even_a_non_special_one(tokenizer: Any) -> None:
    ids = ids_of(tokenizer, "quick brown fox")
    end = ids[1]
    piece = TextAssembler(tokenizer, [], [tokenizer.eos_token_id, end]).push(ids)
    assert piece == Piece(tokenizer.decode(ids[:1]), "stop", 2)


def test_with_min_tokens_stop_strings_count_only_from_the_min_tokens_th_token(tokenizer: Any) -> None:
    # vLLM's min_tokens: the text of the tokens before it is released as it comes, stops and all.
    ids = ids_of(tokenizer, "a STOP b STOP c")
    early = TextAssembler(tokenizer, ["STOP"], [], min_tokens=len(ids_of(tokenizer, "a STOP b")))
    pieces = one_by_one(early, ids)
    assert "".join(p.text for p in pieces) == "a STOP b " and pieces[-1].finished == "stop"
    late = TextAssembler(tokenizer, ["STOP"], [], min_tokens=len(ids) + 5)
    assert "".join(p.text for p in one_by_one(late, ids)) + late.flush() == "a STOP b STOP c"
    assert late.finished is None
    plain = TextAssembler(tokenizer, ["STOP"], [])
    assert "".join(p.text for p in one_by_one(plain, ids)) == "a "


def test_flush_releases_the_held_text_at_the_length_limit(tokenizer: Any) -> None:
    assembler = TextAssembler(tokenizer, ["###", "dog!"], [])
    piece = assembler.push(ids_of(tokenizer, "lazy dog ##"))
    assert piece == Piece("lazy dog ", None, len(ids_of(tokenizer, "lazy dog ##")))
    assert assembler.flush() == "##"
    assert assembler.finished is None


@pytest.mark.parametrize("text", ["héllo 😀", "wörld ### ok 日本語 👩‍💻!", "😀😀 é"])
def test_multi_byte_characters_round_trip_and_never_show_a_replacement_character(tokenizer: Any, text: str) -> None:
    ids = ids_of(tokenizer, text)
    assert len(ids) > len(text.encode()) // 2  # characters really are split across several tokens
    assembler = TextAssembler(tokenizer, [], [])
    pieces = one_by_one(assembler, ids)
    assert all("\ufffd" not in p.text for p in pieces)
    assert any(p.text == "" for p in pieces)  # a partial character was held, not shown broken
    assert "".join(p.text for p in pieces) + assembler.flush() == tokenizer.decode(ids) == text


def test_incremental_output_matches_a_whole_decode_for_any_split(tokenizer: Any) -> None:
    # The assembler never re-decodes the whole text, yet each chunking gives the whole decode.
    ids = ids_of(tokenizer, "GPU fleets serve 😀 model groups, ça va? <|user|> ok")
    whole = tokenizer.decode(ids)
    for size in (1, 2, 3, 5, len(ids)):
        assembler = TextAssembler(tokenizer, ["never"], [])
        pieces = [assembler.push(ids[i : i + size]) for i in range(0, len(ids), size)]
        assert "".join(p.text for p in pieces) + assembler.flush() == whole
        assert sum(p.tokens for p in pieces) == len(ids)


def test_generation_ending_inside_a_character_flushes_as_a_whole_decode_would(tokenizer: Any) -> None:
    ids = ids_of(tokenizer, "ok 😀")[:-1]  # the emoji's last byte never came
    assembler = TextAssembler(tokenizer, [], [])
    sent = "".join(p.text for p in one_by_one(assembler, ids))
    assert "\ufffd" not in sent
    assert sent + assembler.flush() == tokenizer.decode(ids)


def test_a_tokenizer_without_a_fast_backend_is_refused() -> None:
    with pytest.raises(TypeError, match="fast tokenizer"):
        TextAssembler(object(), [], [])


# --- eos_token_ids --------------------------------------------------------------------------


def ns(eos: Any) -> SimpleNamespace:
    return SimpleNamespace(eos_token_id=eos)


@pytest.mark.parametrize(
    ("model", "generation", "tok", "expected"),
    [
        (ns(2), None, ns(2), [2]),
        (ns(2), ns([7, 2]), ns(2), [7, 2]),
        (ns([3, 4]), ns(5), ns(None), [5, 3, 4]),
        (ns(None), ns(None), ns(9), [9]),
        (ns(None), None, ns(None), []),
        (SimpleNamespace(), ns((8, 8, 1)), ns(1), [8, 1]),
    ],
)
def test_eos_token_ids_is_the_deduplicated_union(model: Any, generation: Any, tok: Any, expected: list[int]) -> None:
    assert eos_token_ids(model, generation, tok) == expected


def test_a_saved_model_whose_generation_config_names_its_end_token(tmp_path: Path, demo_models: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path, end_id = save_tiny_llama_with_end_token(tmp_path / "tiny-llama-eot", demo_models.parent / "_tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    generation = GenerationConfig.from_pretrained(path)
    assert end_id != tokenizer.eos_token_id and end_id not in tokenizer.all_special_ids
    assert end_id not in eos_token_ids(config, None, tokenizer)
    ids = eos_token_ids(config, generation, tokenizer)
    assert end_id in ids and tokenizer.eos_token_id in ids

    # The folder's model really answers the reply, then its end token.
    model = AutoModelForCausalLM.from_pretrained(path)
    prompt = torch.tensor([ids_of(tokenizer, "Hello!")])
    out = model.generate(prompt, do_sample=True, temperature=1.0, max_new_tokens=12, generation_config=generation)
    new = out[0, prompt.shape[1] :].tolist()
    reply = ids_of(tokenizer, TINY_LLAMA_REPLY)
    assert new == [*reply, end_id]
    assembler = TextAssembler(tokenizer, [], ids)
    assert assembler.push(new) == Piece(TINY_LLAMA_REPLY, "stop", len(reply) + 1)

"""Text handling of the frontend: incremental detokenization never splits a UTF-8
character, and stop strings are cut even when they arrive in pieces."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from slora.frontend.stop_strings import StopStringMatcher
from slora.frontend.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDetokenizer

TEXTS = ["héllo wörld", "日本語のテキスト", "emoji 👩‍👩‍👧 and ✓", "plain ascii text"]


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    """A byte-level BPE trained here on a few sentences (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20, trainer)
    folder = tmp_path_factory.mktemp("bpe")
    tok.save(str(folder / "tokenizer.json"))
    return str(folder)


def stream(tokenizer, ids: list[int], chunk: int) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=[])
    deltas = [detok.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokens_stream_whole_characters(text, chunk):
    tok = ByteTokenizer(vocab_size=512)
    deltas = stream(tok, tok.encode(text), chunk)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("text", TEXTS)
def test_bpe_tokens_stream_to_the_full_decode(bpe_folder, text):
    tok = HFTokenizer(bpe_folder)
    ids = tok.encode(text)
    deltas = stream(tok, ids, 1)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=0, max_size=40), stop=st.text(min_size=1, max_size=4),
       cut=st.lists(st.integers(1, 5), min_size=1, max_size=40))
def test_stop_string_is_cut_however_the_text_arrives(text, stop, cut):
    matcher = StopStringMatcher([stop])
    pieces, i = [], 0
    for n in cut * 10:
        if i >= len(text):
            break
        pieces.append(text[i:i + n])
        i += n
    pieces.append(text[i:])
    out = "".join(matcher.add(p) for p in pieces) + matcher.flush()
    expected = text[:text.find(stop)] if stop in text else text
    assert out == expected
    assert matcher.stopped == (stop in text)

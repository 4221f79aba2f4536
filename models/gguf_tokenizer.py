"""The tokenizer a GGUF file describes, rebuilt as a Hugging Face `tokenizers` byte-level BPE.

A GGUF has no tokenizer.json: llama.cpp keeps the vocabulary (`tokenizer.ggml.tokens`, each
token spelled in GPT-2's byte alphabet), the merges ("a b", best first), each token's type
(1 normal, 3 control, 4 user-defined) and the name of its pre-tokenizer
(`tokenizer.ggml.pre`). We build the same BPE from those, add control tokens as special
tokens (so "<|im_start|>" stays whole), and split text before byte-level BPE the way
llama.cpp does for that pre-tokenizer name.
"""
from __future__ import annotations

from slora.common.errors import ConfigError

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# llama.cpp pre-tokenizer name -> regexes it splits on (each match isolated) before the
# GPT-2 regex that byte-level BPE applies itself. SmolLM2's "smollm" (like StarCoder's)
# puts every digit alone first, as the model's own tokenizer did in training.
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "gpt2": (),
    "smollm": (r"\p{N}",),
    "starcoder": (r"\p{N}",),
    "refact": (r"\p{N}",),
}


def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map: printable Latin-1 bytes stand for
    themselves, the other 68 take the code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int],
                         pre_tokenizer: str, bos_token: str | None, add_bos: bool):
    """A `tokenizers.Tokenizer` for a GGUF with `tokenizer.ggml.model == "gpt2"`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import processors

    if pre_tokenizer not in PRE_TOKENIZER_SPLITS:
        raise ConfigError(
            f"GGUF pre-tokenizer {pre_tokenizer!r} is not supported; known: "
            f"{', '.join(sorted(PRE_TOKENIZER_SPLITS))}")
    alphabet = byte_alphabet()
    letters = set(alphabet.values())
    # A token written outside the byte alphabet (some converters store raw text) is
    # respelled from its UTF-8 bytes, so BPE can reach it.
    vocab = {}
    for token_id, token in enumerate(tokens):
        if not set(token) <= letters:
            token = "".join(alphabet[b] for b in token.encode("utf-8"))
        vocab[token] = token_id
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right:
            raise ConfigError(f"GGUF merge {merge!r} is not two tokens separated by a space")
        pairs.append((left, right))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated")
              for r in PRE_TOKENIZER_SPLITS[pre_tokenizer]]
    tok.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level]) if splits else byte_level
    tok.decoder = decoders.ByteLevel()
    if add_bos and bos_token is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, vocab[bos_token])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    # A control token must be matched whole in text, never cut by BPE; one written outside
    # the byte alphabet would be a token the vocabulary does not have, so it is left out.
    tok.add_special_tokens([
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(tokens, token_types)
        if kind == TOKEN_TYPE_CONTROL and set(t) <= letters])
    tok.add_tokens([
        AddedToken(t, normalized=False, special=False)
        for t, kind in zip(tokens, token_types)
        if kind == TOKEN_TYPE_USER_DEFINED and t in vocab])
    if tok.get_vocab_size() != len(tokens):
        raise ConfigError(f"GGUF tokenizer: built {tok.get_vocab_size()} tokens from "
                          f"{len(tokens)} (duplicate token spellings?)")
    return tok

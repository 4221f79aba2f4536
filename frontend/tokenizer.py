"""Text <-> token ids for the frontend: Hugging Face `tokenizers` from the model folder's
tokenizer.json, or a byte-level tokenizer for dummy models; the chat template (Jinja, as
transformers applies it); and incremental detokenization that never splits a UTF-8
character nor a multi-token glyph."""
from __future__ import annotations

import functools
import json
import os

from slora.common.errors import InvalidRequestError

REPLACEMENT_CHAR = "\ufffd"
BYTE_OFFSET = 3
"""Byte tokenizer ids: 0 unknown, 1 beginning of sequence, 2 end, then byte b at 3 + b."""


class ByteTokenizer:
    """For dummy models and test models without tokenizer.json: one token per byte."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.bos_token_id, self.eos_token_id = 1, 2
        self.chat_template = None

    def encode(self, text: str) -> list[int]:
        return [b + BYTE_OFFSET if b + BYTE_OFFSET < self.vocab_size else 0
                for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < BYTE_OFFSET + 256)
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, chat: str | list[dict]) -> list[int]:
        return self.encode("".join(f"{m['role']}: {m['content']}\n" for m in as_messages(chat))
                           + "assistant:")


class HFTokenizer:
    """tokenizer.json through `tokenizers`; the chat template from tokenizer_config.json."""

    def __init__(self, folder: str):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        self.vocab_size = self._tok.get_vocab_size()
        cfg = {}
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)
        self.chat_template = cfg.get("chat_template")
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch lets go of the GIL while it works (encode does not): the frontend
        # tokenizes on threads beside its event loop.
        ids = self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if self.add_bos and add_special_tokens and self.bos_token:
            bos = self._tok.token_to_id(self.bos_token)
            if bos is not None and ids[:1] != [bos]:
                ids = [bos] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, chat: str | list[dict]) -> list[int]:
        """The ids of `chat` (one user message, or messages of role and content) rendered
        by the model's template, ready for the assistant's answer. A template that refuses
        the messages (most check the order of roles) raises InvalidRequestError."""
        messages = as_messages(chat)
        if not self.chat_template:
            return self.encode("\n".join(m["content"] for m in messages))
        import jinja2

        try:
            text = self._template().render(
                messages=messages, add_generation_prompt=True,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except jinja2.TemplateError as e:
            raise InvalidRequestError(f"the model's chat template refused the messages: {e}") \
                from None
        # The template writes the special tokens itself.
        return self.encode(text, add_special_tokens=False)

    @functools.cache
    def _template(self):
        import jinja2.sandbox

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True,
                                                           lstrip_blocks=True)

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template)


def as_messages(chat: str | list[dict]) -> list[dict]:
    """One user message, or the messages as given."""
    return [{"role": "user", "content": chat}] if isinstance(chat, str) else chat


def _token_text(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def load_tokenizer(model_folder: str | None, vocab_size: int):
    if model_folder and os.path.exists(os.path.join(model_folder, "tokenizer.json")):
        return HFTokenizer(model_folder)
    return ByteTokenizer(vocab_size)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas. Text is held back while its
    end decodes to U+FFFD (an incomplete UTF-8 sequence or byte-fallback glyph)."""

    # Context tokens decoded before the new ones, so that a tokenizer's leading-space rules
    # see the same neighbourhood as in a full decode.
    CONTEXT = 4

    def __init__(self, tokenizer, prompt_ids: list[int] | None = None):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids or [])[-self.CONTEXT:]
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, new_ids: list[int]) -> str:
        self.ids += new_ids
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT_CHAR):
            return ""
        delta = full[len(prefix):]
        self.prefix_offset = max(self.read_offset, len(self.ids) - self.CONTEXT)
        self.read_offset = len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Whatever is held back, at the end of the stream (may end in U+FFFD)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        delta = full[len(prefix):] if len(full) > len(prefix) else ""
        self.read_offset = len(self.ids)
        self.text += delta
        return delta

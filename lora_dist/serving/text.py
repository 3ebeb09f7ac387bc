"""Prompts to token ids, and generated token ids to text increments that respect stop strings.

A streamed answer must be the same text as the whole answer, cut at the first stop string, with
no part of a stop string ever sent. So the stream holds back the tail of the text that could be
the start of a stop string, and a trailing U+FFFD (half of a multi-byte character).
"""

from __future__ import annotations

from typing import Any

from lora_dist.serving.errors import RequestError


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a completion prompt, with the tokenizer's special tokens (e.g. BOS)."""
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("prompt must be a non-empty string", param="prompt")
    return list(tokenizer(prompt)["input_ids"])


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template, ready to answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model has no chat template; use /v1/completions", param="messages")
    if not messages:
        raise RequestError("messages must not be empty", param="messages")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # the template itself raises on roles it does not take
        message = f"the chat template refused these messages: {exc}"
        raise RequestError(message, param="messages") from exc
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def eos_token_ids(tokenizer: Any, generation_config: Any = None) -> set[int]:
    """End-of-sequence ids of the tokenizer and of the model's generation config."""
    ids: set[int] = set()
    for source in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(generation_config, "eos_token_id", None),
    ):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    return ids


class TextStream:
    """Turns one request's generated token ids into text increments; notices stop strings."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add a token; returns the text that may be sent now (sets `stopped` at a stop string)."""
        self.ids.append(token_id)
        text = self._text()
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._send(text[:cut])
        held = max(
            (k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0
        )
        end = len(text) - held
        if text[:end].endswith("\ufffd"):
            end -= 1
        return self._send(text[:end])

    def finish(self) -> str:
        """The text held back so far, once no more tokens come (nothing after a stop string)."""
        if self.stopped:
            return ""
        return self._send(self._text())

    def _send(self, text: str) -> str:
        # Decoding a longer id list extends the text; what was sent is the answer either way.
        if len(text) <= len(self.sent):
            return ""
        delta = text[len(self.sent) :]
        self.sent += delta
        return delta

"""Chat templates done right: render with the tokenizer's own template, loss on assistant turns.

How a conversation becomes tokens and labels:

1. The template renders the conversation twice: once as is, and once with every message's
   content replaced by a marker. The markers show where each message's text sits in the
   rendered string and which text is the template's own (role headers, end-of-turn tokens).
   If putting the contents back in place of the markers does not give the real rendering
   exactly (the template rewrites text, other than stripping it), or the markers come out
   dropped, repeated or reordered, the row is refused as `template_error`.
2. The rendered string is tokenized as `apply_chat_template(tokenize=True)` would tokenize it,
   with character offsets. If a special token came out of a message's *content* (a literal
   `<|im_end|>` typed by a user), that conversation is tokenized again piece by piece: the
   template's special tokens stay special, and the content is tokenized with
   special tokens turned off, so the literal text stays text. The pieces are tokenized as the
   tokenizer itself treats the text between two special tokens (a SentencePiece "▁" is
   prepended only at the very start), so elsewhere the tokens equal the whole-string ones.
3. A token carries loss when it overlaps an assistant turn: the assistant's content plus the
   template's end of that turn up to and including its first special token (ChatML's
   `<|im_end|>`, Llama 3's `<|eot_id|>`, `</s>`), so the model learns to stop. Text after that
   token (ChatML's newline, the next role header) is context. Every assistant turn of a
   multi-turn conversation carries loss; system and user turns never do.

A model without a chat template is refused with a ModelError, unless `--chat_template plain`
(the documented `User:` / `Assistant:` layout of PLAIN_TEMPLATE, answers ending with EOS) or
`--chat_template FILE.jinja` names one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from jinja2.exceptions import TemplateError
from tokenizers import Tokenizer

from lora_dist.data.formats import BadRow
from lora_dist.errors import ModelError

IGNORE_INDEX = -100
PLAIN_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% else %}Assistant:\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:\n{% endif %}"
)
"""The fallback for a model without a chat template: BOS, the system text, then `User: ...`
and `Assistant:` + newline + answer + EOS, turns separated by blank lines."""
_MARK = "\ue000{}\ue001"  # private-use code points: no template writes them
_MARK_RE = re.compile("\ue000(\\d+)\ue001")
_PROBE = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "U2"},
    {"role": "assistant", "content": "A2"},
]


def resolve_template(tokenizer: Any, chat_template: str | None) -> str:
    """The Jinja source to render with: the tokenizer's own, 'plain', or a file's."""
    if chat_template == "plain":
        return PLAIN_TEMPLATE
    if chat_template is not None:
        path = Path(chat_template)
        if not path.is_file():
            raise ModelError(f"--chat_template {chat_template}: no such file (or use 'plain')")
        return path.read_text(encoding="utf-8")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if not own:
        raise ModelError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')} has no chat "
            "template; pass --chat_template plain (User:/Assistant: turns, answers end with "
            "EOS) or --chat_template FILE.jinja, or use prompt/completion data"
        )
    return own


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation and where its parts are, as character spans of `text`."""

    text: str
    content: list[tuple[int, int]]
    """each message's content, in message order"""
    scaffold: list[tuple[int, int]]
    """the template's own text: before, between and after the contents"""
    loss: list[tuple[int, int]]
    """each assistant turn: its content through the first special token after it"""


def overlapping(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """For (n, 2) token character offsets: does each token overlap one of the sorted,
    disjoint half-open `spans`?"""
    if not spans or len(offsets) == 0:
        return np.zeros(len(offsets), dtype=bool)
    starts = np.fromiter((a for a, _ in spans), dtype=np.int64, count=len(spans))
    ends = np.fromiter((b for _, b in spans), dtype=np.int64, count=len(spans))
    k = np.searchsorted(ends, offsets[:, 0], side="right")  # first span ending after the start
    inside = k < len(spans)
    return inside & (starts[np.minimum(k, len(spans) - 1)] < offsets[:, 1])


def _no_prefix(node: Any) -> None:
    """Turn Metaspace's prepend_scheme 'first' into 'never' in a pre-tokenizer's JSON."""
    if not isinstance(node, dict):
        return
    if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
        node["prepend_scheme"] = "never"
    for child in node.get("pretokenizers") or []:
        _no_prefix(child)


def piece_tokenizers(tokenizer: Any) -> tuple[Any, Any] | None:
    """Two copies of the backend tokenizer that never parse special tokens: one for text at the
    start of a string, one for text that follows a special token. The second differs only for
    SentencePiece's Metaspace(prepend_scheme='first'), which puts "▁" at the very start alone.
    None when the tokenizer has no `tokenizers` backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    state = json.loads(backend.to_str())
    _no_prefix(state.get("pre_tokenizer"))
    first, rest = Tokenizer.from_str(backend.to_str()), Tokenizer.from_str(json.dumps(state))
    for t in (first, rest):
        t.encode_special_tokens = True
    return first, rest


class ChatRenderer:
    """Renders and tokenizes conversations with one tokenizer and template."""

    def __init__(self, tokenizer: Any, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.template = resolve_template(tokenizer, chat_template)
        specials = sorted(
            {t.content for t in tokenizer.added_tokens_decoder.values() if t.special},
            key=len,
            reverse=True,
        )
        if not specials:
            raise ModelError("the tokenizer has no special tokens: no turn could ever end")
        self._special_re = re.compile("|".join(map(re.escape, specials)))
        self._special_ids = np.array(
            sorted(tokenizer.convert_tokens_to_ids(specials)), dtype=np.int64
        )
        self._pieces = piece_tokenizers(tokenizer)
        self._check_template()

    def _check_template(self) -> None:
        """Refuse a template whose assistant turns do not end with a special token."""
        for probe in (_PROBE, _PROBE[1:]):  # some templates refuse a system turn
            try:
                self.render(probe)
                return
            except BadRow as bad:
                problem = bad.detail
        raise ModelError(f"the chat template cannot be used for training: {problem}")

    def _apply(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
        except TemplateError as exc:
            raise BadRow("template_error", str(exc)) from None

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> Rendered:
        """The template's rendering of `messages` and the spans of its parts; raises BadRow."""
        marked = [{"role": m["role"], "content": _MARK.format(i)} for i, m in enumerate(messages)]
        skeleton = self._apply(marked, generation_prompt)
        real = self._apply(messages, generation_prompt)
        parts = _MARK_RE.split(skeleton)
        scaffold, order = parts[0::2], [int(x) for x in parts[1::2]]
        if order != list(range(len(messages))):
            raise BadRow(
                "template_error",
                "the chat template drops, repeats or reorders messages, so the assistant's "
                "tokens cannot be found",
            )
        for transform in (str, str.strip):
            contents = [transform(m["content"]) for m in messages]
            pieces = [scaffold[0]]
            for text, after in zip(contents, scaffold[1:], strict=True):
                pieces += [text, after]
            if "".join(pieces) == real:
                break
        else:
            raise BadRow(
                "template_error", "the chat template rewrites message text, so it cannot be traced"
            )
        content, scaffold_spans, loss, pos = [], [], [], 0
        for i, piece in enumerate(pieces):
            span = (pos, pos + len(piece))
            (scaffold_spans if i % 2 == 0 else content).append(span)
            pos = span[1]
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            end = self._special_re.search(real, content[i][1], scaffold_spans[i + 1][1])
            if end is None:
                raise BadRow(
                    "template_error",
                    "the chat template ends an assistant turn without a special token "
                    "(EOS or end-of-turn), so the model would never learn to stop",
                )
            loss.append((content[i][0], end.end()))
        return Rendered(real, content, scaffold_spans, loss)

    def protected_tokens(self, r: Rendered) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and offsets with special tokens taken only from the template's own text."""
        segments: list[tuple[int, int, bool]] = []
        pos = 0
        for a, b in r.scaffold:
            for m in self._special_re.finditer(r.text, a, b):
                if m.start() > pos:
                    segments.append((pos, m.start(), False))
                segments.append((m.start(), m.end(), True))
                pos = m.end()
        if pos < len(r.text):
            segments.append((pos, len(r.text), False))
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for a, b, special in segments:
            if special:
                ids.append(self.tokenizer.convert_tokens_to_ids(r.text[a:b]))
                offsets.append((a, b))
                continue
            piece_ids, piece_offsets = self._encode_piece(r.text[a:b], at_start=a == 0)
            ids += piece_ids
            offsets += [(a + s, a + e) for s, e in piece_offsets]
        return np.asarray(ids, dtype=np.int64), np.asarray(offsets, dtype=np.int64).reshape(-1, 2)

    def _encode_piece(self, text: str, at_start: bool) -> tuple[list[int], list[tuple[int, int]]]:
        if self._pieces is None:  # no tokenizers backend: the tokenizer's own switch
            enc = self.tokenizer(
                text,
                add_special_tokens=False,
                split_special_tokens=True,
                return_offsets_mapping=True,
            )
            return enc["input_ids"], enc["offset_mapping"]
        enc = self._pieces[0 if at_start else 1].encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def _tokenize(self, rendered: list[Rendered]) -> list[tuple[np.ndarray, np.ndarray]]:
        if not rendered:
            return []
        enc = self.tokenizer(
            [r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True
        )
        out = []
        for r, ids, offs in zip(rendered, enc["input_ids"], enc["offset_mapping"], strict=True):
            ids = np.asarray(ids, dtype=np.int64)
            offs = np.asarray(offs, dtype=np.int64).reshape(-1, 2)
            if (np.isin(ids, self._special_ids) & overlapping(offs, r.content)).any():
                ids, offs = self.protected_tokens(r)  # content typed a special token's text
            out.append((ids, offs))
        return out

    def encode(
        self, conversations: list[list[dict[str, str]]]
    ) -> list[tuple[np.ndarray, np.ndarray] | BadRow]:
        """(input_ids, labels) per conversation, labels IGNORE_INDEX outside assistant turns;
        a BadRow in place of a conversation the template refuses."""
        rendered: list[Rendered | BadRow] = []
        for conv in conversations:
            try:
                rendered.append(self.render(conv))
            except BadRow as bad:
                rendered.append(bad)
        good = [r for r in rendered if isinstance(r, Rendered)]
        tokens = iter(self._tokenize(good))
        out: list[tuple[np.ndarray, np.ndarray] | BadRow] = []
        for r in rendered:
            if isinstance(r, BadRow):
                out.append(r)
                continue
            ids, offs = next(tokens)
            out.append((ids, np.where(overlapping(offs, r.loss), ids, IGNORE_INDEX)))
        return out

    def prompt(self, messages: list[dict[str, str]]) -> tuple[list[int], str]:
        """Tokens and text of `messages` plus the template's generation prompt: what the model
        is asked to answer. Raises BadRow."""
        rendered = self.render(messages, generation_prompt=True)
        ids, _ = self._tokenize([rendered])[0]
        return ids.tolist(), rendered.text

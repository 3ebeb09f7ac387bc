"""Chat templates on SmolLM2's tokenizer: loss on exactly the assistant turns, special-token
text stays text, and templates that cannot be traced are refused."""

from __future__ import annotations

import pytest

from lora_dist.data.chat import IGNORE_INDEX, PLAIN_TEMPLATE, ChatRenderer
from lora_dist.data.formats import BadRow
from lora_dist.errors import ModelError
from tests.data.chat_data import (
    CONVERSATIONS,
    SPECIAL_TEXT,
    chatml_expected,
    smollm2_tokenizer,
    tiny_tokenizer,
)

ZEPHYR_LIKE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def renderer(tok) -> ChatRenderer:
    return ChatRenderer(tok)


def test_smollm2_loss_is_exactly_the_assistant_turns(tok, renderer) -> None:
    """Against ChatML written by hand, piece by piece (tests/chat_data.py)."""
    encoded = renderer.encode(CONVERSATIONS)
    for conv, (ids, labels) in zip(CONVERSATIONS, encoded, strict=True):
        want_ids, want_labels = chatml_expected(tok, conv)
        assert ids.tolist() == want_ids
        assert labels.tolist() == want_labels
        # and what apply_chat_template itself gives, for text without special-token look-alikes
        assert ids.tolist() == tok.apply_chat_template(conv, tokenize=True, return_dict=False)
        answers = [m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant"]
        assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "".join(answers)


def _prefix_diff_labels(tok, template: str | None, conv: list[dict]) -> list[int]:
    """An independent rendering: the assistant's tokens of turn k are what rendering turns
    0..k adds to rendering 0..k-1 with the generation prompt, through the first special token
    (the template's end of turn)."""
    kw = {"chat_template": template, "tokenize": True, "return_dict": False}
    full = tok.apply_chat_template(conv, **kw)
    labels = [IGNORE_INDEX] * len(full)
    specials = set(tok.all_special_ids)
    for k, m in enumerate(conv):
        if m["role"] != "assistant":
            continue
        asked = tok.apply_chat_template(conv[:k], add_generation_prompt=True, **kw)
        answered = tok.apply_chat_template(conv[: k + 1], **kw)
        start = len(asked)
        stop = next(i for i in range(start, len(answered)) if answered[i] in specials) + 1
        assert full[:stop] == answered[:stop] and answered[:start] == asked  # true prefixes
        labels[start:stop] = full[start:stop]
    return labels


@pytest.mark.parametrize(
    "which, template",
    [("smollm2", None), ("smollm2", ZEPHYR_LIKE), ("smollm2", "plain"), ("tiny", "plain")],
)
def test_loss_tokens_agree_with_prefix_rendering(which, template, tmp_path) -> None:
    tok = smollm2_tokenizer() if which == "smollm2" else tiny_tokenizer()
    if template == ZEPHYR_LIKE:
        path = tmp_path / "zephyr.jinja"
        path.write_text(template)
        chat_template, jinja = str(path), template
    else:
        chat_template, jinja = template, PLAIN_TEMPLATE if template == "plain" else None
    r = ChatRenderer(tok, chat_template)
    for conv, (ids, labels) in zip(CONVERSATIONS, r.encode(CONVERSATIONS), strict=True):
        assert labels.tolist() == _prefix_diff_labels(tok, jinja, conv)
        assert ids.tolist() == tok.apply_chat_template(
            conv, chat_template=jinja, tokenize=True, return_dict=False
        )
        # the piecewise tokenization used for look-alike text gives the same tokens here
        rendered = r.render(conv)
        whole = tok(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
        piece_ids, piece_offsets = r.protected_tokens(rendered)
        assert piece_ids.tolist() == whole["input_ids"]
        assert piece_offsets.tolist() == [list(o) for o in whole["offset_mapping"]]


def test_special_token_text_in_content_stays_text(tok, renderer) -> None:
    [(ids, labels)] = renderer.encode([SPECIAL_TEXT])
    want_ids, want_labels = chatml_expected(tok, SPECIAL_TEXT)
    assert ids.tolist() == want_ids and labels.tolist() == want_labels
    # exactly the template's special tokens: one <|im_start|> and one <|im_end|> per message
    start, end, text_id = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    assert ids.tolist().count(start) == ids.tolist().count(end) == len(SPECIAL_TEXT)
    assert text_id not in ids.tolist()
    # whereas rendering and tokenizing naively turns the user's text into control tokens
    naive = tok.apply_chat_template(SPECIAL_TEXT, tokenize=True, return_dict=False)
    assert naive.count(end) > len(SPECIAL_TEXT) and text_id in naive
    answer = tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert answer == SPECIAL_TEXT[-1]["content"] + "<|im_end|>"
    # the prompt for generation is protected the same way
    prompt, text = renderer.prompt(SPECIAL_TEXT[:2])
    assert prompt == want_ids[: len(prompt)] and prompt.count(end) == 2
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(prompt) == text


def test_no_template_is_a_clear_error_and_plain_is_the_fallback() -> None:
    """The tiny model's SentencePiece tokenizer has no chat template."""
    tiny = tiny_tokenizer()
    assert tiny.chat_template is None
    with pytest.raises(ModelError, match="no chat template.*--chat_template plain"):
        ChatRenderer(tiny)
    r = ChatRenderer(tiny, "plain")
    [(ids, labels)] = r.encode([CONVERSATIONS[0][:3]])
    assert r.render(CONVERSATIONS[0][:3]).text == (
        "<s>You answer in one line.\n\nUser: What is 2+2?\n\nAssistant:\n4.</s>\n\n"
    )
    assert tiny.decode([t for t in labels if t != IGNORE_INDEX]) == "4.</s>"
    # a literal </s> typed in a message stays text on SentencePiece too
    typed = [
        {"role": "user", "content": "type </s> here"},
        {"role": "assistant", "content": "ok </s>"},
    ]
    [(ids, labels)] = r.encode([typed])
    assert ids.tolist().count(tiny.eos_token_id) == 1 and ids.tolist().count(tiny.bos_token_id) == 1
    assert tiny.decode([t for t in labels if t != IGNORE_INDEX]) == "ok </s></s>"


def test_templates_that_cannot_be_traced_are_refused(tok, tmp_path) -> None:
    no_end = tmp_path / "no_end.jinja"
    no_end.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}")
    with pytest.raises(ModelError, match="without a special token"):
        ChatRenderer(tok, str(no_end))
    trims = tmp_path / "trims.jinja"
    trims.write_text(ZEPHYR_LIKE.replace("m['content'] }}", "m['content'] | trim }}"))
    padded = [{"role": "user", "content": "  hi  "}, {"role": "assistant", "content": " yo \n"}]
    [(ids, labels)] = ChatRenderer(tok, str(trims)).encode([padded])
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "yo<|im_end|>"
    upper = tmp_path / "upper.jinja"
    upper.write_text(ZEPHYR_LIKE.replace("m['content'] }}", "m['content'] | upper }}"))
    r = ChatRenderer(tok, str(upper))  # the probe is upper case already: it passes
    [bad] = r.encode([padded])
    assert isinstance(bad, BadRow) and bad.kind == "template_error" and "rewrites" in bad.detail
    refuses = tmp_path / "refuses.jinja"
    refuses.write_text(
        "{% for m in messages %}{% if m['content'] == 'x' %}{{ raise_exception('no x') }}"
        "{% endif %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    )
    [bad] = ChatRenderer(tok, str(refuses)).encode([[{"role": "user", "content": "x"}] + padded])
    assert isinstance(bad, BadRow) and bad.kind == "template_error" and "no x" in bad.detail

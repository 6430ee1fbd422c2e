"""Prompt rendering and tokenisation (SPEC section 2) with a tiny tokenizer that has a chat template."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from lens_jax.data import tokenizer as tokenizer_lib
from lens_jax.text import prompt as P

TEMPLATE = ("{% for m in messages %}<|start|>{{ m.role }}<|message|>{% if m.thinking is defined %}{{ m.thinking }}"
            "<|end|><|start|>{{ m.role }}<|message|>{{ m.content }}<|return|>{% else %}{{ m.content }}<|end|>{% endif %}"
            "{% endfor %}")


@pytest.fixture(scope="module")
def chat_tok():
    tok = tokenizer_lib.build_word_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|start|>", "<|end|>", "<|message|>", "<|return|>"]})
    tok.chat_template = TEMPLATE
    return tok


def test_render_three_messages_cut_at_return(chat_tok):
    text = P.render_prompt(chat_tok, "a red circle")
    assert text.startswith("<|start|>system<|message|>" + P.SYSTEM_PROMPT)
    assert "<|start|>user<|message|>a red circle<|end|>" in text
    assert P.ASSISTANT_THINKING in text
    assert "<|return|>" not in text and text.endswith("<|start|>assistant<|message|>")


def test_preamble_and_offset_warning(chat_tok):
    prefix = P.render_prompt(chat_tok, "XX").split("XX")[0]
    n = len(chat_tok(prefix, add_special_tokens=True)["input_ids"])
    assert P.preamble_length(chat_tok) == n > 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        P.check_offset(chat_tok, n)
    with pytest.warns(UserWarning, match=rf"{n} tokens but the text offset is 97"):
        P.check_offset(chat_tok, 97)
    assert P.preamble_length(tokenizer_lib.build_word_tokenizer()) == 0


def test_tokenize_right_padding_and_truncation(chat_tok):
    prompts = ["a red circle", "a large blue square on the left of a small green triangle"]
    ids, mask = P.tokenize_prompts(chat_tok, prompts, max_length=512)
    rows = [chat_tok(P.render_prompt(chat_tok, p), add_special_tokens=True)["input_ids"] for p in prompts]
    assert ids.shape == (2, max(map(len, rows))) and ids.dtype == np.int32 and mask.dtype == bool
    for i, r in enumerate(rows):
        assert ids[i, :len(r)].tolist() == r and mask[i, :len(r)].all() and not mask[i, len(r):].any()
        assert (ids[i, len(r):] == chat_tok.pad_token_id).all()
    ids, mask = P.tokenize_prompts(chat_tok, prompts, max_length=20)
    assert ids.shape == (2, 20) and mask.all() and ids[1].tolist() == rows[1][:20]


def test_plain_tokenizer_matches_training_tokenization():
    tok = tokenizer_lib.build_word_tokenizer()
    prompts = ["a red circle", "a small green triangle above a blue square"]
    ids, mask = P.tokenize_prompts(tok, prompts, max_length=32)
    train_ids, train_mask = tokenizer_lib.tokenize(tok, prompts, 32)
    t = ids.shape[1]
    assert t == train_mask.sum(1).max()
    np.testing.assert_array_equal(ids, train_ids[:, :t])
    np.testing.assert_array_equal(mask, train_mask[:, :t])

"""Prompts -> token ids, as the official Lens pipeline renders them (SPEC section 2).

With a tokenizer that has a chat template (the released GPT-OSS `tokenizer/` folder), each prompt
becomes the three-message conversation

    system:    "Describe the image by detailing the color, shape, ..."
    user:      the prompt
    assistant: thinking "Need to generate one image according to the description.", empty content

rendered with the tokenizer's own template (`add_generation_prompt=False`), cut at the first
`<|return|>` (the marker itself is dropped), and tokenised with `add_special_tokens=True`.

Without a chat template (the tiny word tokenizer of the procedural dataset) the prompt text is
tokenised as it is, with `add_special_tokens=False`: exactly what training fed the model
(lens_jax.data.tokenizer.tokenize).

Either way: right padding to the longest prompt of the batch (or `pad_to`), truncation to
`max_length` tokens *including* the preamble. The leading `offset` tokens (the official 97,
DEFAULT_TXT_OFFSET) are dropped later, by `text_features(..., offset)`; `check_offset` warns when
the rendered preamble does not have `offset` tokens (gpt-oss's header carries the current date, so
its length can change).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

SYSTEM_PROMPT = ("Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
                 "relationships of the objects and background.")
ASSISTANT_THINKING = "Need to generate one image according to the description."
RETURN_MARKER = "<|return|>"
DEFAULT_TXT_OFFSET = 97
DEFAULT_MAX_LENGTH = 512
_SENTINEL = "\u2063LENSPROMPTSENTINEL\u2063"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def conversation(prompt: str) -> list[dict]:
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": "", "thinking": ASSISTANT_THINKING},
    ]


def render_prompt(tokenizer, prompt: str) -> str:
    """The text the encoder reads for `prompt` (before tokenisation)."""
    if not has_chat_template(tokenizer):
        return prompt
    text = tokenizer.apply_chat_template(conversation(prompt), tokenize=False, add_generation_prompt=False)
    cut = text.find(RETURN_MARKER)
    return text if cut < 0 else text[:cut]


def preamble_length(tokenizer) -> int:
    """Tokens before the user's prompt in the rendered conversation (0 without a chat template)."""
    if not has_chat_template(tokenizer):
        return 0
    text = render_prompt(tokenizer, _SENTINEL)
    pos = text.find(_SENTINEL)
    if pos < 0:
        raise ValueError("the tokenizer's chat template does not write the user message")
    return len(_encode(tokenizer, [text[:pos]], add_special_tokens=True)[0])


def check_offset(tokenizer, offset: int) -> int:
    """Warn (naming both numbers) when the preamble's token count differs from `offset`; returns the count."""
    n = preamble_length(tokenizer)
    if n != offset:
        warnings.warn(f"the rendered prompt preamble has {n} tokens but the text offset is {offset}: "
                      f"{'prompt tokens are dropped' if n < offset else 'preamble tokens reach the DiT'} "
                      f"(the chat header's date can change the preamble's length)", stacklevel=2)
    return n


def _encode(tokenizer, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        if backend.truncation is not None:  # an earlier HF call may have left these set
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
        return [list(e.ids) for e in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
    return [list(tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"]) for t in texts]


def tokenize_prompts(tokenizer, prompts: Sequence[str] | str, max_length: int = DEFAULT_MAX_LENGTH, *,
                     pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [N, T], mask bool [N, T]): rendered, right-padded to the longest row (at least `pad_to`,
    at most `max_length`), truncated to `max_length`."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    chat = has_chat_template(tokenizer)
    texts = [render_prompt(tokenizer, p) for p in prompts]
    rows = [r[:max_length] for r in _encode(tokenizer, texts, add_special_tokens=chat)] if texts else []
    length = max([len(r) for r in rows] + [int(pad_to or 0), 1])
    length = min(length, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = True
    return ids, mask

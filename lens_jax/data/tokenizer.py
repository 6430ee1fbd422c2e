"""Word-level tokenizer over the shapes grammar, built offline with the ``tokenizers`` library.

One token per word or punctuation mark of :data:`lens_jax.data.shapes.VOCABULARY`, so a dense caption
of 60-120 words is 66-128 tokens (mean ~98) (the toy keeps Lens's text/image token proportions; see DESIGN.md).
Ids are deterministic: ``<pad>=0, <unk>=1, <bos>=2, <eos>=3``, then the sorted vocabulary.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from lens_jax.data import shapes

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS)


def build_word_tokenizer(vocabulary: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """A fast tokenizer: lower-cases, splits on whitespace and isolates each punctuation mark.

    ``tokenizer(text)`` adds no special tokens unless ``add_special_tokens=True`` is asked for and the
    post-processor wraps the text in ``<bos> ... <eos>``.
    """
    words = list(shapes.VOCABULARY if vocabulary is None else vocabulary)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in sorted(set(words)):
        if w not in vocab:
            vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
        padding_side="right", truncation_side="right", model_max_length=1 << 20)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path: str | os.PathLike) -> str:
    """Writes the tokenizer to a local folder (``save_pretrained``); returns the folder."""
    os.makedirs(path, exist_ok=True)
    tokenizer.save_pretrained(str(path))
    return str(path)


# Alias with the name the brief uses.
save = save_tokenizer


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Loads a tokenizer saved by :func:`save_tokenizer` (local files only, never the network)."""
    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


def tokenize(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str] | str, max_len: int, *,
             add_special_tokens: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded, truncated ``(ids int32 [N, max_len], mask bool [N, max_len])``."""
    if isinstance(texts, str):
        texts = [texts]
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    texts = list(texts)
    ids = np.full((len(texts), max_len), tokenizer.pad_token_id or 0, np.int32)
    mask = np.zeros((len(texts), max_len), bool)
    if not texts:
        return ids, mask
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None:  # an earlier HF call may have left these set
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    encs = backend.encode_batch(texts, add_special_tokens=add_special_tokens)
    for i, enc in enumerate(encs):
        row = enc.ids[:max_len]
        ids[i, :len(row)] = row
        mask[i, :len(row)] = True
    return ids, mask

"""A byte-level BPE tokenizer trained on the experiment's own training text (``tokenizers``,
seconds on a CPU, nothing downloaded), shared by the translation and summarization runs.

Ids 0-3 are reserved: ``PAD`` (padding, also T5's decoder start), ``EOS`` (end of a target),
``UNK`` and ``SEP`` (between a decoder-only model's source and target).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["EOS", "PAD", "SEP", "SPECIAL", "UNK", "train_bpe"]

SPECIAL = ("<pad>", "</s>", "<unk>", "<sep>")
PAD, EOS, UNK, SEP = range(len(SPECIAL))


def train_bpe(texts: Iterable[str], vocab_size: int) -> Any:
    """A ``tokenizers.Tokenizer`` (byte-level BPE, no added prefix space) of ``vocab_size``
    ids trained on ``texts``, with :data:`SPECIAL` as ids 0-3. Deterministic for a given
    ``texts`` order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(SPECIAL) + len(alphabet):
        raise ValueError(
            f"vocab_size must be at least {len(SPECIAL) + len(alphabet)} (the special tokens "
            f"and 256 bytes), got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL[UNK]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer

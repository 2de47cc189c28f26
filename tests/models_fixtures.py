"""Test helpers for models: a tokenizer that needs no download, and a trainable-parameter count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers
from torch import nn


def tiny_tokenizer(directory: Path, *, words: tuple[str, ...] = ()) -> Any:
    """A WordPiece tokenizer over special tokens, a-z, ##a-##z and ``words``, written to ``directory``.

    Any lower-case text tokenizes (unknown words fall back to letters), so tests need no download.
    The vocabulary has 5 + 52 + len(words) entries: pass ``vocab_size`` at least that to the model.
    """
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{c}" for c in letters), *words]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # BertTokenizerFast is exported lazily (transformers 5 makes it an alias of BertTokenizer), so
    # static checkers cannot see it; it is the Rust-backed WordPiece tokenizer in both 4.x and 5.x.
    # Loaded from the folder: transformers 5 renamed the constructor's vocab_file to vocab and ignores
    # the old name, which left a tokenizer of the five special tokens that read every word as [UNK].
    fast_tokenizer = getattr(transformers, "BertTokenizerFast")  # noqa: B009
    return fast_tokenizer.from_pretrained(str(directory), do_lower_case=True)


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)

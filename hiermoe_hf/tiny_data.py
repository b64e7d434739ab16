"""Offline text and tokenizer for the default fine-tune: no download, the same on any machine.

- ``byte_tokenizer()``: a byte-level tokenizer with exactly 256 ids (id = byte value), as a
  ``PreTrainedTokenizerFast`` that ``save_pretrained``/``AutoTokenizer.from_pretrained`` round-trip.
- ``builtin_corpus()``: English prose from the docstrings of Python's standard library, collected
  at run time (a few hundred KB).
- ``pack_blocks()``: token ids -> fixed-length causal-LM blocks (``input_ids`` = ``labels``).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Iterable

import torch

# Modules with long, stable, prose-heavy docstrings; order fixes the corpus.
_CORPUS_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email", "enum", "fractions", "functools", "heapq", "html", "http.client", "inspect",
    "itertools", "json", "logging", "os", "pathlib", "pickle", "pydoc", "random", "re", "shutil",
    "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest",
    "urllib.parse", "uuid", "zipfile",
)


def byte_tokenizer():
    """A 256-token byte-level tokenizer (id == byte), so vocab_size=256 models fit.

    The end-of-sequence (and padding) token is byte 0 (NUL, absent from text): TRL's SFTTrainer needs
    an eos and a pad token, and a new id would grow the vocabulary past the model's 256.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's table, what ByteLevel uses

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    nul = bytes_to_unicode()[0]  # byte 0's symbol: an existing id, marked special
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1 << 20, eos_token=nul, pad_token=nul)


def builtin_corpus(min_chars: int = 200) -> list[str]:
    """Paragraph-sized texts from standard-library docstrings (modules, classes, functions)."""
    texts: list[str] = []
    seen: set[str] = set()
    for name in _CORPUS_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a trimmed Python build: skip, the rest is plenty
            continue
        objects = [module] + [obj for _, obj in sorted(vars(module).items()) if inspect.isclass(obj) or callable(obj)]
        for obj in objects:
            doc = inspect.getdoc(obj)
            if doc and len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                texts.append(doc)
    return texts


def pack_blocks(token_lists: Iterable[list[int]], block_size: int, separator: list[int] | None = None) -> torch.Tensor:
    """Concatenate token lists (with ``separator`` between them) and cut full blocks: int64 [N, block_size]."""
    flat: list[int] = []
    for ids in token_lists:
        flat.extend(ids)
        if separator:
            flat.extend(separator)
    n = len(flat) // block_size
    if n == 0:
        raise ValueError(f"the dataset has {len(flat)} tokens, fewer than one block of {block_size}; use a shorter "
                         "--seq-len or more text")
    return torch.tensor(flat[: n * block_size], dtype=torch.int64).view(n, block_size)

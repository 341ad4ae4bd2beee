"""Tokenizers for generative models, read from the JSON file named in config.toml.

Two kinds exist, both small enough to carry no code and no merges table:

``{"type": "byte"}``
    Token *i* is byte *i* (256 tokens); any text can be encoded. Text is decoded
    incrementally, so a character split over several tokens is only shown once
    all of its bytes have arrived.
``{"type": "char", "vocab": ["\\n", " ", "a", ...], "unknown": "?"}``
    Token *i* is the *i*-th string of ``vocab`` (one character each). A prompt
    character outside the vocabulary becomes ``unknown`` when one is given and
    is refused otherwise.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from edgeinferd.errors import ConfigError, InvalidInput


class Decoder(Protocol):
    """Turns token ids into text one at a time, keeping partial characters back."""

    def decode(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def decoder(self) -> Decoder: ...

    def to_json(self) -> dict[str, Any]: ...


class _ByteDecoder:
    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def decode(self, token_id: int) -> str:
        return self._utf8.decode(bytes((token_id,)))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class ByteTokenizer:
    """UTF-8 bytes as tokens: no unknown characters, ever."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def decoder(self) -> Decoder:
        return _ByteDecoder()

    def to_json(self) -> dict[str, Any]:
        return {"type": "byte"}


class _CharDecoder:
    def __init__(self, vocab: Sequence[str]) -> None:
        self._vocab = vocab

    def decode(self, token_id: int) -> str:
        return self._vocab[token_id]

    def flush(self) -> str:
        return ""


class CharTokenizer:
    """One token per character of a fixed vocabulary."""

    def __init__(self, vocab: Sequence[str], unknown: str | None = None) -> None:
        self.vocab = list(vocab)
        self.vocab_size = len(self.vocab)
        self._ids = {char: index for index, char in enumerate(self.vocab)}
        self.unknown = unknown
        self._unknown_id = self._ids[unknown] if unknown is not None else None

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        ids = []
        for char in text:
            token = self._ids.get(char, self._unknown_id)
            if token is None:
                raise InvalidInput(
                    f"the prompt contains {char!r}, which is not in the model's vocabulary"
                    f" of {self.vocab_size} characters"
                )
            ids.append(token)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.vocab[i] for i in ids)

    def decoder(self) -> Decoder:
        return _CharDecoder(self.vocab)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": "char", "vocab": self.vocab}
        if self.unknown is not None:
            data["unknown"] = self.unknown
        return data


def load_tokenizer(path: Path, where: str) -> Tokenizer:
    """Read a tokenizer file; ConfigError names the file and what is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(where, "", "tokenizer file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(where, "", f"unreadable: {error}") from None
    return tokenizer_from_json(data, where)


def tokenizer_from_json(data: Any, where: str) -> Tokenizer:
    if not isinstance(data, dict):
        raise ConfigError(where, "", "expected a JSON object")
    kind = data.get("type")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        vocab = data.get("vocab")
        if (
            not isinstance(vocab, list)
            or not vocab
            or not all(isinstance(c, str) and len(c) == 1 for c in vocab)
        ):
            raise ConfigError(where, "vocab", "expected a non-empty list of single characters")
        if len(set(vocab)) != len(vocab):
            raise ConfigError(where, "vocab", "a character appears twice")
        unknown = data.get("unknown")
        if unknown is not None and unknown not in vocab:
            raise ConfigError(where, "unknown", f"{unknown!r} is not in vocab")
        return CharTokenizer(vocab, unknown)
    raise ConfigError(where, "type", f"expected 'byte' or 'char', got {kind!r}")

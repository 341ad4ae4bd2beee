"""A model's tokenizer: the `tokenizers` library reading the version's tokenizer.json.

The same file Hugging Face ships (or ``edgeinferd import`` builds from a GGUF
vocabulary); no code from it runs. Text is decoded incrementally
(``DecodeStream``), so a character split over several byte-level tokens is
shown once all of its bytes have arrived, and special tokens (``<|im_end|>``)
are never shown.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as _Backend
from tokenizers.decoders import DecodeStream

from edgeinferd.errors import ConfigError


class Decoder:
    """Turns token ids into text one at a time, keeping partial characters back."""

    def __init__(self, backend: _Backend) -> None:
        self._backend = backend
        self._stream = DecodeStream(skip_special_tokens=True)

    def decode(self, token_id: int) -> str:
        return self._stream.step(self._backend, token_id) or ""

    def flush(self) -> str:
        return ""


class Tokenizer:
    def __init__(self, backend: _Backend, bos_token_id: int | None, add_bos: bool) -> None:
        self._backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos and bos_token_id is not None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in it (``<|im_start|>``) stay whole."""
        ids: list[int] = self._backend.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._backend.decode(list(ids), skip_special_tokens=True))

    def decoder(self) -> Decoder:
        return Decoder(self._backend)

    def token_text(self, token_id: int | None) -> str:
        """A token's own spelling (``<|im_end|>``), or "" for none."""
        if token_id is None:
            return ""
        return str(self._backend.id_to_token(token_id) or "")


def load_tokenizer(
    path: Path, where: str, bos_token_id: int | None = None, add_bos: bool = False
) -> Tokenizer:
    """Read tokenizer.json; ConfigError names the file and what is wrong."""
    try:
        backend = _Backend.from_file(str(path))
    except FileNotFoundError:
        raise ConfigError(where, "", "tokenizer file not found") from None
    except Exception as error:  # the library raises plain Exception for a bad file
        raise ConfigError(where, "", f"unreadable tokenizer: {error}") from None
    return Tokenizer(backend, bos_token_id, add_bos)

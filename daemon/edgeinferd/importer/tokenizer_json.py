"""A `tokenizers` tokenizer.json from a GGUF file's byte-level BPE vocabulary.

GGUF stores a GPT-2-style vocabulary (tokens already spelled in GPT-2's
byte-to-unicode alphabet), its merges, each token's type (3 = control, 4 =
user-defined) and the name of the pre-tokenizer its merges were learned with
(``tokenizer.ggml.pre``). The pre-tokenizers here are llama.cpp's
(``llama-vocab.cpp``) written as `tokenizers` components; a name not listed is
refused rather than guessed, since a wrong split changes every token id.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from edgeinferd.importer.checkpoint import ImportRefused

_GPT2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)

_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer | None:
    if pre in ("default", "gpt-2", "gpt2"):
        return _GPT2
    if pre == "smollm":
        # llama.cpp: "\p{N}" (each digit alone), then GPT-2's expression; SmolLM's own
        # tokenizer.json says the same as Digits(individual_digits) + ByteLevel.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _GPT2])
    if pre in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe"):
        return _split_then_bytes(_LLAMA3)
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return _split_then_bytes(_QWEN2)
    return None


SUPPORTED_PRE_TOKENIZERS = ("default", "gpt2", "smollm", "llama-bpe", "llama3", "qwen2")


def build_bpe_tokenizer(
    tokens: list[str], merges: list[str], token_types: list[int], pre: str, where: str
) -> str:
    """The tokenizer.json text for a GGUF byte-level BPE vocabulary."""
    pre_tokenizer = _pre_tokenizer(pre)
    if pre_tokenizer is None:
        raise ImportRefused(
            f"{where}: pre-tokenizer {pre!r} is not supported; expected one of"
            f" {', '.join(SUPPORTED_PRE_TOKENIZERS)}"
        )
    if not merges:
        raise ImportRefused(f"{where}: the BPE vocabulary has no merges (tokenizer.ggml.merges)")
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs: list[tuple[str, str]] = []
    for merge in merges:
        left, _, right = merge.partition(" ")
        pairs.append((left, right))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    specials = [
        AddedToken(token, special=True, normalized=False)
        for token, kind in zip(tokens, token_types, strict=False)
        if kind == 3
    ]
    user_defined = [
        AddedToken(token, special=False, normalized=False)
        for token, kind in zip(tokens, token_types, strict=False)
        if kind == 4
    ]
    tokenizer.add_special_tokens(specials)
    tokenizer.add_tokens(user_defined)
    return tokenizer.to_str()

"""SmolLM2 as imported and served equals transformers' own model of the same GGUF file.

The peer is transformers' ``LlamaForCausalLM`` (fp32, dequantized from the same
GGUF), loaded once a session; our side is ``edgeinferd import`` then the real
daemon called through the real client (greedy tokens), or the imported version
folder loaded in-process (logits, tokenizer, chat template).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import edgeinfer
from edgeinferd.generation.chat import Message
from edgeinferd.generation.model import load_language_model
from tests import llm
from tests.conftest import Daemon

#: ASCII, accents, CJK, emoji, code, runs of spaces and newlines, special tokens.
TEXTS = [
    "Hello, world! How are you today?",
    "Crème brûlée, naïve café, Ærøskøbing, São Paulo",
    "日本語のテキストと中文文本",
    "Emoji: 🙂🚀👩‍💻 and ❤️",
    "def f(x):\n    return {'a': [x, x ** 2]}  # comment\n",
    "spaces:    four, then\t\ttabs and\n\n\nnewlines   \n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "it's, we're, they'll, I'd",
]
#: Digits: SmolLM2's own tokenizer (and llama.cpp's "smollm" pre-tokenizer) splits them one
#: by one; transformers' GGUF loader does not know that pre-tokenizer and keeps GPT-2's.
DIGITS = ["In 2024, 1234567 people paid $3.50 each.", "x = 10_000 + 0.125e-3"]
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]


@pytest.fixture(scope="module")
def fp32_model(llm_repo: Path):  # type: ignore[no-untyped-def]
    return load_language_model(llm_repo / llm.FP32 / "1")


def test_tokenizer_equals_transformers_on_every_kind_of_text(fp32_model) -> None:  # type: ignore[no-untyped-def]
    _, reference = llm.reference()
    for text in TEXTS:
        ours = fp32_model.tokenizer.encode(text)
        assert ours == reference(text, add_special_tokens=False).input_ids, text
        assert fp32_model.tokenizer.decode(ours) == reference.decode(ours, skip_special_tokens=True)
        if "<|" not in text:
            assert fp32_model.tokenizer.decode(ours) == text


def test_digits_are_split_one_by_one_as_smollm2_was_trained(fp32_model) -> None:  # type: ignore[no-untyped-def]
    """The reference here is transformers' vocabulary and merges with SmolLM2's own
    pre-tokenizer (Digits(individual_digits=True) then ByteLevel, from its tokenizer.json)."""
    from tokenizers import pre_tokenizers

    _, reference = llm.reference()
    backend = reference.backend_tokenizer
    saved = backend.pre_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    try:
        for text in DIGITS:
            ours = fp32_model.tokenizer.encode(text)
            assert ours == backend.encode(text, add_special_tokens=False).ids, text
            assert fp32_model.tokenizer.decode(ours) == text
            pieces = [fp32_model.tokenizer.decode([i]) for i in ours]
            assert all(len(p.strip()) <= 1 for p in pieces if p.strip().isdigit())
    finally:
        backend.pre_tokenizer = saved


def test_chat_template_renders_what_apply_chat_template_renders(fp32_model) -> None:  # type: ignore[no-untyped-def]
    _, reference = llm.reference()
    conversations = [
        [{"role": "user", "content": llm.QUESTION}],
        [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "Colour of the sky?"},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "And grass?"},
        ],
    ]
    for messages in conversations:
        expected = reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        ours = fp32_model.chat_template.render([Message(m["role"], m["content"]) for m in messages])
        assert ours == expected


def test_fp32_logits_equal_transformers(fp32_model) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = llm.reference()
    ids = tokenizer(
        PROMPTS[2] + " there lived an old clockmaker", add_special_tokens=False
    ).input_ids
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    ours = fp32_model.logits(ids)
    assert ours.shape == expected.shape
    # Same fp32 weights, different summation order: observed max difference ~1e-4.
    torch.testing.assert_close(ours, expected, atol=2e-3, rtol=1e-4)


def test_greedy_generation_through_the_daemon_equals_transformers(llm_daemon: Daemon) -> None:
    """Token for token; both stop at EOS (id 2), and the prompts run 32 tokens or close."""
    model, tokenizer = llm.reference()
    lengths = []
    with llm_daemon.client(timeout=300) as client:
        for prompt in PROMPTS:
            ids = tokenizer(prompt, add_special_tokens=False).input_ids
            with torch.no_grad():
                expected = model.generate(
                    torch.tensor([ids]),
                    max_new_tokens=32,
                    do_sample=False,
                    eos_token_id=2,
                    pad_token_id=2,
                )[0, len(ids) :].tolist()
            result = client.generate_text(llm.FP32, ids, max_new_tokens=32)
            assert result.token_ids == expected, prompt
            lengths.append(len(expected))
    assert sorted(lengths)[-2:] == [32, 32], lengths


def test_chat_answer_through_the_daemon_equals_transformers(llm_daemon: Daemon) -> None:
    model, tokenizer = llm.reference()
    messages = [{"role": "user", "content": llm.QUESTION}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        expected = model.generate(
            torch.tensor([ids]), max_new_tokens=40, do_sample=False, eos_token_id=2, pad_token_id=2
        )[0, len(ids) :].tolist()
    with llm_daemon.client(timeout=300) as client:
        result = client.chat_text(
            llm.FP32, [edgeinfer.ChatMessage("user", llm.QUESTION)], max_new_tokens=40
        )
    assert result.token_ids == expected
    assert result.summary.prompt_tokens == len(ids)
    assert result.summary.finish_reason == "STOP"
    assert result.text == tokenizer.decode(expected, skip_special_tokens=True)

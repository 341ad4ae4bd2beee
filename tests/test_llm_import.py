"""``edgeinferd import`` of Hugging Face folders, checked against transformers.

The folders are what ``save_pretrained`` writes for tiny random Llama and
Qwen2 models (Qwen2 has q/k/v biases); their tokenizer is SmolLM2's, saved by
transformers from the GGUF file. Also: the sampling filters against
transformers' own logits processors, and what the importer refuses.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgeinferd.generation.model import load_language_model
from edgeinferd.generation.sampling import SamplingParams, penalize, sample
from tests import llm


def tiny_folder(path: Path, model_type: str) -> Path:
    import transformers

    _, tokenizer = llm.reference()
    common = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=10000.0, tie_word_embeddings=model_type == "qwen2",
    )  # fmt: skip
    torch.manual_seed(0)
    if model_type == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
        with torch.no_grad():  # random biases, so that dropping them would show
            for layer in model.model.layers:
                for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    projection.bias.normal_(0, 0.5)
    model.eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def import_(
    source: Path, repo: Path, name: str, form: str = "none"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeinferd", "import", str(source), "--repository", str(repo),
         "--name", name, "--quantize", form],
        capture_output=True, text=True,
    )  # fmt: skip


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_a_hugging_face_folder_imports_with_the_same_logits(
    tmp_path: Path, model_type: str
) -> None:
    import transformers

    folder = tiny_folder(tmp_path / "hf", model_type)
    done = import_(folder, tmp_path / "repo", "tiny")
    assert done.returncode == 0, done.stderr
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = llm.reference()[1]("Hello there, general Kenobi", add_special_tokens=False).input_ids
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    model = load_language_model(tmp_path / "repo" / "tiny" / "1")
    torch.testing.assert_close(model.logits(ids), expected, atol=1e-4, rtol=1e-4)
    manifest = json.loads((tmp_path / "repo" / "tiny" / "1" / "manifest.json").read_text())
    assert manifest["source"]["format"] == "huggingface"
    assert len(manifest["source"]["sha256"]) == 64
    # int4 and int8 of random weights: close, not equal (a wrong layout scores near 0).
    for form in ("int8", "int4"):
        assert import_(folder, tmp_path / "repo", f"tiny-{form}", form).returncode == 0
        quantized = load_language_model(tmp_path / "repo" / f"tiny-{form}" / "1").logits(ids)
        similarity = torch.nn.functional.cosine_similarity(quantized, expected, dim=-1)
        assert similarity.min() > 0.95, (form, similarity)


def test_unsupported_sources_are_refused_naming_what_was_found(tmp_path: Path) -> None:
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    refused = import_(folder, tmp_path / "repo", "x")
    assert refused.returncode == 2
    assert "model_type 'gpt2' is not supported" in refused.stderr
    assert "Traceback" not in refused.stderr
    pickled = tiny_folder(tmp_path / "pickled", "llama")
    for weights in pickled.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    refused = import_(pickled, tmp_path / "repo", "y")
    assert refused.returncode == 2 and "pickles, which are never loaded" in refused.stderr
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\0" * 64)
    refused = import_(garbage, tmp_path / "repo", "z")
    assert refused.returncode == 2 and "garbage.gguf" in refused.stderr
    assert not (tmp_path / "repo" / "z" / "1").exists()


def test_sampling_filters_match_transformers_logits_processors() -> None:
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
    )

    torch.manual_seed(0)
    logits = torch.randn(1000) * 3
    history = [5, 17, 17, 999, 0]
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history]), logits[None])[0]
    torch.testing.assert_close(penalize(logits, history, 1.3), expected)
    # min_p: every token we can draw is one transformers keeps, and every kept one is drawn.
    kept = MinPLogitsWarper(0.2)(None, torch.log_softmax(logits, -1)[None])[0] > float("-inf")
    params = SamplingParams(temperature=1.0, min_p=0.2)
    generator = torch.Generator().manual_seed(1)
    drawn = {sample(logits, params, generator) for _ in range(3000)}
    assert drawn == set(torch.nonzero(kept).flatten().tolist())


@pytest.mark.parametrize("inner", [100, 104, 576])
def test_int8_matrices_of_any_width_multiply_many_rows(inner: int) -> None:
    """The int8 kernel crashed the process (torch 2.13, AVX-512 CPU) for several rows when
    a matrix's inner dimension was not a multiple of 16, as in the tiny test models: the
    matrix pads it with zeros, and products and embedding rows stay those of the weights."""
    from edgeinferd.generation.quantize import Int8Matrix

    codes = torch.randint(
        -127, 128, (64, inner), dtype=torch.int8, generator=torch.Generator().manual_seed(0)
    )
    scale = torch.rand(64, generator=torch.Generator().manual_seed(1)) / 100
    matrix = Int8Matrix(codes, scale)
    assert matrix.codes.shape[1] % 16 == 0  # what the kernel is given
    weights = codes.to(torch.float32) * scale[:, None]
    x = torch.randn(3, 5, inner, generator=torch.Generator().manual_seed(2))
    # bf16 activations inside the kernel: close to the fp32 product, not equal.
    torch.testing.assert_close(matrix.matmul(x), x @ weights.T, atol=0.05, rtol=0.02)
    ids = torch.tensor([[0, 7, 63]])
    assert torch.equal(matrix.rows(ids), weights[ids])

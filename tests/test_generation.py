"""Generate: token streaming from a tiny random transformer, through a real daemon."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

import edgeinfer
from edgeinfer import cli
from edgeinferd.generation import loop
from edgeinferd.generation.engine import GenerationEngine
from edgeinferd.generation.model import GenerativeModel, load_generative
from edgeinferd.generation.params import validate
from edgeinferd.generation.sequence import GenerationSummary
from edgeinferd.generation.text import TextStream
from edgeinferd.generation.tokenizer import ByteTokenizer, CharTokenizer, Tokenizer
from edgeinferd.generation.transformer import (
    DecoderLM,
    TransformerShape,
    to_torchscript,
    write_model,
)
from edgeinferd.repository import Repository
from tests import models
from tests.conftest import Daemon, daemon_config, short_tmpdir

CHARS = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .\n")
LONG = 2000  # tokens: a generation that lasts long enough to be interrupted


def add_tiny(
    repo: Path,
    name: str,
    tokenizer: Tokenizer,
    context: int = 128,
    max_sequences: int = 8,
    seed: int = 0,
) -> None:
    torch.manual_seed(seed)
    shape = TransformerShape(tokenizer.vocab_size, context=context, dim=32, layers=2, heads=2)
    module = to_torchscript(DecoderLM(shape))
    write_model(repo, name, module, shape, tokenizer, max_sequences=max_sequences)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("generation")
    add_tiny(repo, "tiny", ByteTokenizer())
    add_tiny(repo, "chars", CHARS, seed=1)
    add_tiny(repo, "long", CHARS, context=LONG + 16, max_sequences=2, seed=2)
    add_tiny(repo, "doomed", CHARS, context=LONG + 16, seed=3)
    models.add_mlp(repo)
    return repo


@pytest.fixture(scope="module")
def daemon(repo: Path) -> Iterator[Daemon]:
    workdir = short_tmpdir()
    config = daemon_config(repo, '[logging]\nlevel = "debug"\n')
    process = Daemon(config, workdir).wait_ready()
    yield process
    process.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def client(daemon: Daemon) -> Iterator[edgeinfer.Client]:
    with daemon.client(timeout=30) as c:
        yield c


def in_process(repo: Path, name: str) -> GenerativeModel:
    repository = Repository(repo)
    config = repository.read_config(name)
    return load_generative(config, repository.version_files(config))


def ended_lines(daemon: Daemon, request_id: str) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in daemon.log_text().splitlines() if x.startswith("{")]
    return [
        x for x in lines if x.get("event") == "generation ended" and x["request_id"] == request_id
    ]


def wait_for_end(daemon: Daemon, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if found := ended_lines(daemon, request_id):
            return found[0]
        time.sleep(0.02)
    raise AssertionError(f"no 'generation ended' for {request_id}:\n{daemon.log_text()[-2000:]}")


SAMPLED: list[dict[str, Any]] = [
    {"temperature": 0.0},
    {"temperature": 1.0, "seed": 11},
    {"temperature": 0.8, "top_k": 5, "seed": 12},
    {"temperature": 1.3, "top_p": 0.7, "seed": 13},
    {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 2**64 - 1},
]


@pytest.mark.parametrize("params", SAMPLED)
def test_seeded_generation_equals_in_process_reference(
    repo: Path, client: edgeinfer.Client, params: dict[str, Any]
) -> None:
    """The daemon's tokens and text equal the plain one-sequence loop's, token for token."""
    model = in_process(repo, "tiny")
    expected = loop.generate(model, validate(model, "The model ", max_new_tokens=40, **params))
    result = client.generate_text("tiny", "The model ", max_new_tokens=40, **params)
    assert result.token_ids == expected.token_ids
    assert result.text == expected.text
    assert result.summary.finish_reason == "LENGTH"
    assert (result.summary.prompt_tokens, result.summary.generated_tokens) == (10, 40)


def test_cached_decoding_equals_recomputing_the_whole_sequence(repo: Path) -> None:
    """Decoding rows of different lengths together gives the logits of a full forward pass."""
    model = in_process(repo, "chars")
    eager = DecoderLM(TransformerShape(CHARS.vocab_size, context=128, dim=32, layers=2, heads=2))
    eager.load_state_dict(model.module.state_dict())
    prompts, following = [[1, 2, 3, 4, 5, 6, 7], [8, 9]], [10, 11]
    batch = model.new_batch()
    for prompt in prompts:
        batch.add(model.prefill(prompt)[1])
    decoded = model.decode(batch, following)
    with torch.no_grad():
        for row, (prompt, token) in enumerate(zip(prompts, following, strict=True)):
            full = eager.logits(torch.tensor([[*prompt, token]]))[0, -1]
            torch.testing.assert_close(decoded[row], full, rtol=1e-4, atol=1e-5)


def test_concurrent_generations_equal_the_same_requests_one_by_one(
    daemon: Daemon, client: edgeinfer.Client
) -> None:
    """Sequences sharing decoding steps produce exactly what each produces alone."""
    requests = [
        ("tiny" if i % 2 else "chars", "hello there"[: 3 + i], {**SAMPLED[i % 5], "seed": 100 + i})
        for i in range(8)
    ]
    alone = [
        client.generate_text(model, prompt, max_new_tokens=30 + i, **params)
        for i, (model, prompt, params) in enumerate(requests)
    ]

    async def together() -> list[edgeinfer.GenerateResult]:
        async with edgeinfer.AsyncClient(daemon.address, timeout=30) as aclient:
            return await asyncio.gather(
                *(
                    aclient.generate_text(model, prompt, max_new_tokens=30 + i, **params)
                    for i, (model, prompt, params) in enumerate(requests)
                )
            )

    crowd = asyncio.run(together())
    assert [(r.token_ids, r.text) for r in crowd] == [(r.token_ids, r.text) for r in alone]


def test_leaving_the_stream_stops_the_engine_before_its_next_step(repo: Path) -> None:
    """After a cancelled sequence the engine takes no further step and frees the slot."""
    model = in_process(repo, "long")

    async def scenario() -> tuple[int, int, int, int]:
        with ThreadPoolExecutor(2) as executor:
            engine = GenerationEngine(model, 2, executor)
            sequence = engine.submit(validate(model, "abc", max_new_tokens=LONG))
            stream = engine.stream(sequence)
            for _ in range(3):
                await anext(stream)
            await stream.aclose()
            active = engine.active
            await asyncio.sleep(0.05)  # a step already running finishes
            steps = engine.steps
            await asyncio.sleep(0.3)
            await engine.close()
            return active, steps, engine.steps, sequence.steps

    active, steps_then, steps_later, sequence_steps = asyncio.run(scenario())
    assert active == 0
    assert steps_later == steps_then
    assert sequence_steps < 50


def test_closing_the_call_ends_the_generation_in_the_daemon(
    daemon: Daemon, client: edgeinfer.Client
) -> None:
    """A client that stops reading cancels the call; the daemon stops generating."""
    events = client.generate("long", "abc", max_new_tokens=LONG, request_id="closed-early")
    for _ in range(3):
        next(events)
    events.close()
    ended = wait_for_end(daemon, "closed-early")
    assert ended["finish_reason"] == "CLIENT_CANCELLED"
    assert ended["generated_tokens"] < LONG // 2


def test_a_deadline_ends_the_generation(daemon: Daemon, client: edgeinfer.Client) -> None:
    """A call whose deadline passes gets DEADLINE_EXCEEDED and the generation stops."""
    with pytest.raises(edgeinfer.EdgeInferError) as caught:
        for _ in client.generate(
            "long", "abc", max_new_tokens=LONG, request_id="deadline", timeout=0.3
        ):
            pass
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for_end(daemon, "deadline")["generated_tokens"] < LONG


def test_a_stop_sequence_ends_generation_before_it(client: edgeinfer.Client) -> None:
    """The text ends just before the first stop sequence, with finish reason STOP."""
    full = client.generate_text("chars", "the ", max_new_tokens=60, seed=5, temperature=1.0)
    stop = full.text[20:23]
    cut = full.text.index(stop)
    result = client.generate_text(
        "chars", "the ", max_new_tokens=60, seed=5, temperature=1.0, stop=["\x00never", stop]
    )
    assert result.summary.finish_reason == "STOP"
    assert result.text == full.text[:cut]
    assert result.token_ids == full.token_ids[: cut + len(stop)]


def test_max_new_tokens_ends_generation_with_length(client: edgeinfer.Client) -> None:
    """Exactly max_new_tokens tokens come, one chunk each, then a LENGTH summary."""
    events = list(client.generate("chars", "abc", max_new_tokens=7, seed=1, temperature=1.0))
    chunks, summary = events[:-1], events[-1]
    assert all(len(c.token_ids) == 1 for c in chunks if isinstance(c, edgeinfer.GenerateChunk))
    assert len(chunks) == 7
    assert isinstance(summary, edgeinfer.GenerateSummary)
    assert (summary.finish_reason, summary.generated_tokens) == ("LENGTH", 7)
    assert summary.time_to_first_token_s > 0 and summary.tokens_per_second > 0


BAD: list[tuple[str, Any, dict[str, Any], grpc.StatusCode, str]] = [
    ("tiny", "hi", {"max_new_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    ("tiny", "hi", {"max_new_tokens": 127}, grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    ("tiny", "hi", {"top_p": 0.0}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ("tiny", "hi", {"top_p": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ("tiny", "hi", {"temperature": -0.5}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ("tiny", "", {}, grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
    ("tiny", [], {}, grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
    ("tiny", [1, 256], {}, grpc.StatusCode.INVALID_ARGUMENT, "token id 256"),
    ("chars", "ABC", {}, grpc.StatusCode.INVALID_ARGUMENT, "'A'"),
    ("tiny", "hi", {"stop": [""]}, grpc.StatusCode.INVALID_ARGUMENT, "stop sequence"),
    ("missing", "hi", {}, grpc.StatusCode.NOT_FOUND, "'missing'"),
    ("mlp", "hi", {}, grpc.StatusCode.INVALID_ARGUMENT, "not generative"),
    ("tiny", "hi", {"version": "9"}, grpc.StatusCode.NOT_FOUND, "version '9'"),
]


@pytest.mark.parametrize(("model", "prompt", "params", "code", "says"), BAD)
def test_bad_parameters_are_refused_with_the_parameter_named(
    client: edgeinfer.Client,
    model: str,
    prompt: Any,
    params: dict[str, Any],
    code: grpc.StatusCode,
    says: str,
) -> None:
    """Each bad request gets its status code and a message naming what is wrong."""
    with pytest.raises(edgeinfer.EdgeInferError) as caught:
        client.generate_text(model, prompt, **{"max_new_tokens": 4, **params})
    assert caught.value.code is code
    assert says in caught.value.message


def test_predict_on_a_generative_model_is_refused(client: edgeinfer.Client) -> None:
    """Predict names Generate as the call a generative model takes."""
    with pytest.raises(edgeinfer.EdgeInferError) as caught:
        client.predict("tiny", {"tokens": np.zeros((1, 1), np.int64)})
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "Generate" in caught.value.message


def test_beyond_max_sequences_is_resource_exhausted_until_a_slot_frees(
    client: edgeinfer.Client,
) -> None:
    """A third sequence on a two-slot model is refused at once; closing one frees its slot."""
    first = client.generate("long", "ab", max_new_tokens=LONG)
    second = client.generate("long", "ba", max_new_tokens=LONG)
    next(first), next(second)
    with pytest.raises(edgeinfer.EdgeInferError) as caught:
        client.generate_text("long", "c", max_new_tokens=LONG)
    assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_sequences 2" in caught.value.message
    first.close()
    deadline = time.monotonic() + 5
    while True:
        try:
            result = client.generate_text("long", "c", max_new_tokens=3)
            break
        except edgeinfer.EdgeInferError as error:
            if error.code is not grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    second.close()
    assert result.summary.generated_tokens == 3


def test_the_cli_streams_text_and_json_chunks(
    daemon: Daemon, client: edgeinfer.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    """`edgeinfer generate` prints the generated text, or one JSON object per chunk."""
    expected = client.generate_text("chars", "abc", max_new_tokens=12, seed=3, temperature=1.0)
    argv = ["-a", daemon.address, "generate", "chars", "abc", "--max-new-tokens", "12"]
    argv += ["--seed", "3", "--temperature", "1.0"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert out == expected.text + "\n"
    assert "[LENGTH: 3 prompt + 12 generated tokens" in err
    assert cli.main(["--json", *argv]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "".join(line.get("text", "") for line in lines) == expected.text
    assert [i for line in lines for i in line.get("token_ids", [])] == expected.token_ids
    assert lines[-1]["finish_reason"] == "LENGTH" and len(lines) == 13


def test_unloading_the_model_cancels_its_running_generations(client: edgeinfer.Client) -> None:
    """A generation running when its model is unloaded ends with finish reason CANCELLED."""
    events = client.generate("doomed", "abc", max_new_tokens=LONG)
    next(events)
    client.unload_model("doomed")
    last = list(events)[-1]
    assert isinstance(last, edgeinfer.GenerateSummary)
    assert last.finish_reason == "CANCELLED"
    assert last.generated_tokens < LONG


def test_text_that_could_start_a_stop_sequence_is_held_back() -> None:
    """A partial stop match is shown only once it is known not to be the stop."""
    stream = TextStream(CHARS, stops=["cat"])
    shown = [stream.push(CHARS.encode(c)[0]) for c in "a ca c"]
    assert [text for text, _ in shown] == ["a", " ", "", "", "ca ", ""]
    assert not any(stopped for _, stopped in shown)
    assert stream.push(CHARS.encode("a")[0]) == ("", False)
    assert stream.push(CHARS.encode("t")[0]) == ("", True)
    assert stream.text == "a ca "


def test_multibyte_characters_appear_once_complete() -> None:
    """Byte tokens of one UTF-8 character yield nothing until the last byte arrives."""
    stream = TextStream(ByteTokenizer())
    pieces = [stream.push(b)[0] for b in "é!".encode()]
    assert pieces == ["", "é", "!"]


def test_summary_reports_the_seed_drawn_for_an_unseeded_request(repo: Path) -> None:
    """An unseeded request can be replayed from the seed its summary reports."""
    model = in_process(repo, "chars")

    async def run(seed: int | None) -> tuple[list[int], GenerationSummary]:
        with ThreadPoolExecutor(1) as executor:
            engine = GenerationEngine(model, 1, executor)
            params = validate(model, "ab", max_new_tokens=20, temperature=1.0, seed=seed)
            ids: list[int] = []
            async for event in engine.stream(engine.submit(params)):
                if isinstance(event, GenerationSummary):
                    await engine.close()
                    return ids, event
                ids.extend(event.token_ids)
        raise AssertionError("no summary")

    first, summary = asyncio.run(run(None))
    again, _ = asyncio.run(run(summary.seed))
    assert again == first

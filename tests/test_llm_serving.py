"""Serving SmolLM2 (its default int4 form) through a real daemon and the real client.

Continuous batching must not change anyone's tokens, every way a generation
can end has its finish reason, bad requests are refused naming the field, and
the key/value cache is allocated once.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

import edgeinfer
from tests import llm
from tests.conftest import Daemon, StartDaemon

PROMPTS = [
    "The three primary colours are",
    "def add(a, b):",
    "My favourite season is autumn because",
    "Water boils at",
]


def chat(question: str) -> list[edgeinfer.ChatMessage]:
    return [edgeinfer.ChatMessage("user", question)]


def test_concurrent_generations_equal_the_same_requests_one_by_one(llm_daemon: Daemon) -> None:
    """On the fp32 form: a batched decode step gives each row the logits it gets alone to
    ~5e-5. The int4 kernel returns bf16, and rounds differently for 1 row than for 4
    (logits apart by up to 0.4 measured), so a sampled int4 token may differ in a crowd."""
    requests = [
        {"prompt": p, "max_new_tokens": 24, "temperature": t, "seed": s, "top_p": 0.9}
        for p, t, s in zip(PROMPTS, (0.0, 0.8, 0.0, 1.0), (None, 7, None, 11), strict=True)
    ]

    def run(request: dict[str, object]) -> list[int]:
        with llm_daemon.client(timeout=300) as client:
            options = {k: v for k, v in request.items() if k != "prompt"}
            prompt = str(request["prompt"])
            return client.generate_text(llm.FP32, prompt, **options).token_ids  # type: ignore[arg-type]

    alone = [run(r) for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(run, requests))
    assert together == alone
    assert all(len(ids) >= 8 for ids in alone)


def test_a_long_prompt_prefilled_in_chunks_gives_the_same_tokens(llm_daemon: Daemon) -> None:
    """smollm2-chunked prefills 5 tokens a step (the others' decoding in between)."""
    prompt = " ".join(PROMPTS) + " Tell me more about each of these."
    with llm_daemon.client(timeout=300) as client:
        whole = client.generate_text(llm.NAME, prompt, max_new_tokens=16)
        with ThreadPoolExecutor(2) as pool:
            other = pool.submit(
                client.generate_text, "smollm2-chunked", PROMPTS[0], max_new_tokens=40
            )
            chunked = client.generate_text("smollm2-chunked", prompt, max_new_tokens=16)
            other_alone = other.result()
        assert chunked.token_ids == whole.token_ids
        assert chunked.summary.prompt_tokens == whole.summary.prompt_tokens > 20
        assert (
            other_alone.token_ids
            == client.generate_text("smollm2-chunked", PROMPTS[0], max_new_tokens=40).token_ids
        )


def test_the_model_ends_its_answer_with_finish_reason_stop(llm_daemon: Daemon) -> None:
    with llm_daemon.client(timeout=300) as client:
        result = client.chat_text(llm.NAME, chat(llm.QUESTION), max_new_tokens=64)
    assert "Paris" in result.text
    assert result.summary.finish_reason == "STOP"
    assert result.summary.generated_tokens < 64
    assert result.token_ids[-1] == 2  # <|im_end|>, never shown as text
    assert "<|im_end|>" not in result.text


def test_max_new_tokens_stop_sequences_and_the_context_each_end_a_generation(
    llm_daemon: Daemon,
) -> None:
    with llm_daemon.client(timeout=300) as client:
        length = client.generate_text(llm.NAME, PROMPTS[1], max_new_tokens=5)
        assert (length.summary.finish_reason, length.summary.generated_tokens) == ("LENGTH", 5)
        free = client.generate_text(llm.NAME, PROMPTS[1], max_new_tokens=30).text
        stop = free.strip()[:6][-2:]
        stopped = client.generate_text(llm.NAME, PROMPTS[1], max_new_tokens=30, stop=[stop])
        assert stopped.summary.finish_reason == "STOP"
        assert stop not in stopped.text and free.startswith(stopped.text)
        # smollm2-short has 48 positions per slot.
        ids = client.generate_text(llm.NAME, PROMPTS[2], max_new_tokens=1).token_ids
        prompt = [int(i) for i in range(100, 140)]
        full = client.generate_text(
            "smollm2-short", prompt, max_new_tokens=48, temperature=0.7, seed=1
        )
        assert full.summary.finish_reason == "CONTEXT"
        assert full.summary.prompt_tokens + full.summary.generated_tokens == 48
        assert ids


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 10**6}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": 1.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"stop": [""]}, "stop sequence"),
        ({"stop": ["x" * 257]}, "too long (1 to 256 chars)"),
        ({"stop": [str(i) for i in range(17)]}, "17 stop sequences; at most 16"),
    ],
)
def test_bad_parameters_are_refused_with_the_parameter_named(
    llm_daemon: Daemon, options: dict[str, object], named: str
) -> None:
    with llm_daemon.client(timeout=60) as client, pytest.raises(edgeinfer.EdgeInferError) as caught:
        client.generate_text(llm.NAME, "hi", **options)  # type: ignore[arg-type]
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert named in caught.value.message


def test_oversized_prompts_and_bad_messages_are_refused_before_any_work(llm_daemon: Daemon) -> None:
    with llm_daemon.client(timeout=60) as client:
        cases = [
            ("smollm2-short", list(range(48)), "48 tokens"),
            ("smollm2-short", "x" * (48 * 32 + 1), "characters"),
            (llm.NAME, [49152], "outside the vocabulary"),
            (llm.NAME, [edgeinfer.ChatMessage("wizard", "hi")], "role"),
            (llm.NAME, [edgeinfer.ChatMessage("user", "hi")] * 257, "257 messages; at most 256"),
            (llm.NAME, "", "empty"),
        ]
        for model, prompt, named in cases:
            with pytest.raises(edgeinfer.EdgeInferError) as caught:
                client.generate_text(model, prompt, max_new_tokens=4)  # type: ignore[arg-type]
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, named
            assert named in caught.value.message
        with pytest.raises(edgeinfer.EdgeInferError) as predicted:
            client.predict(llm.NAME, {})
        assert predicted.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "generative" in predicted.value.message
        # ...and it still serves.
        assert (
            client.generate_text(llm.NAME, "Hello", max_new_tokens=2).summary.generated_tokens == 2
        )


def test_beyond_max_sequences_is_resource_exhausted_while_the_slots_are_taken(
    llm_daemon: Daemon,
) -> None:
    """smollm2-short has 2 slots: two open streams hold them until they are closed."""
    with llm_daemon.client(timeout=120) as client:
        streams = [
            client.generate("smollm2-short", [100, 101], max_new_tokens=40, temperature=1.0, seed=s)
            for s in (1, 2)
        ]
        for stream in streams:
            next(stream)  # the first chunk: the slot is taken
        with pytest.raises(edgeinfer.EdgeInferError) as caught:
            client.generate_text("smollm2-short", [100], max_new_tokens=2)
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_sequences 2" in caught.value.message
        for stream in streams:
            stream.close()
        refusals = []
        for _ in range(200):  # the slots free as soon as the daemon sees the calls end
            try:
                client.generate_text("smollm2-short", [100], max_new_tokens=2)
                break
            except edgeinfer.EdgeInferError as error:
                refusals.append(error.code)
        else:
            pytest.fail("the slots never freed")
        assert set(refusals) <= {grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_the_cache_is_allocated_once_and_memory_stays_flat_over_64_generations(
    llm_daemon: Daemon,
) -> None:
    async def main() -> tuple[int, int]:
        async with edgeinfer.AsyncClient(llm_daemon.address, timeout=300) as client:

            async def some(count: int) -> None:
                for i in range(count):
                    await client.generate_text(
                        llm.NAME, PROMPTS[i % 4], max_new_tokens=6, temperature=1.0, seed=i
                    )

            await asyncio.gather(*(some(5) for _ in range(4)))
            before = (await client.get_stats()).resident_memory_bytes
            await asyncio.gather(*(some(16) for _ in range(4)))
            after = (await client.get_stats()).resident_memory_bytes
            return before, after

    before, after = asyncio.run(main())
    # A cache grown per generation (or per step) would add far more: 64 x 16 positions
    # x 30 layers x 2 x 3 heads x 64 x 4 bytes = 45 MiB.
    assert after - before < 16 * 2**20, (before, after)


def test_chat_cli_answers_one_question(llm_daemon: Daemon) -> None:
    env = {**os.environ, "EDGEINFER_ADDRESS": llm_daemon.address}
    answer = subprocess.run(
        [sys.executable, "-m", "edgeinfer.cli", "chat", llm.NAME, llm.QUESTION],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    )  # fmt: skip
    assert "Paris" in answer.stdout
    assert "[STOP:" in answer.stderr
    lines = subprocess.run(
        [sys.executable, "-m", "edgeinfer.cli", "--json", "chat", llm.NAME, llm.QUESTION,
         "--max-new-tokens", "3", "--temperature", "0.5", "--seed", "3", "--min-p", "0.05"],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert json.loads(lines[-1])["finish_reason"] == "LENGTH"
    assert len(lines) == 4


def test_interactive_chat_keeps_the_conversation(llm_daemon: Daemon) -> None:
    """A real terminal (a pty): the second question is sent with the first exchange."""
    import pty

    env = {**os.environ, "EDGEINFER_ADDRESS": llm_daemon.address}
    main, secondary = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "edgeinfer.cli", "--json", "chat", llm.NAME,
         "--max-new-tokens", "24"],
        stdin=secondary, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    os.close(secondary)
    os.write(main, b"My name is Ada.\nWhat is my name?\n\n")
    out, _ = process.communicate(timeout=300)
    os.close(main)
    assert process.returncode == 0
    lines = [line.replace("> ", "").strip() for line in out.decode().splitlines()]
    events = [json.loads(line) for line in lines if line]
    summaries = [e for e in events if "finish_reason" in e]
    assert len(summaries) == 2, out
    first, second = summaries
    # The second prompt holds the first question, its answer and the new question.
    assert second["prompt_tokens"] > first["prompt_tokens"] + first["generated_tokens"]


def test_unloading_the_model_cancels_its_running_generations(
    llm_repo: Path, start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A private daemon (unloading would disturb the shared one) on one model that shares
    smollm2's weights; the generation runs until the unload, then ends CANCELLED."""
    repo = tmp_path / "repo"
    (repo / "only" / "1").mkdir(parents=True)
    for file in (llm_repo / llm.NAME / "1").iterdir():
        os.link(file, repo / "only" / "1" / file.name)
    (repo / "only" / "config.toml").write_text("[generation]\nmax_sequences = 1\ncontext = 4096\n")
    daemon = start_daemon(repo)
    with daemon.client(timeout=300) as client:
        events = client.generate("only", PROMPTS[0], max_new_tokens=4000, temperature=1.0, seed=1)
        first = next(events)  # running: it holds the only slot
        assert isinstance(first, edgeinfer.GenerateChunk)
        client.unload_model("only")
        last = list(events)[-1]
        assert isinstance(last, edgeinfer.GenerateSummary)
        assert last.finish_reason == "CANCELLED"
        assert last.generated_tokens < 4000

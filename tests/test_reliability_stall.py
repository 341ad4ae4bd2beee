"""Oversized requests and another caller: precise refusals, and the other caller keeps going.

A second OS process calls the daemon's health check back to back and records
when each call started and ended (CLOCK_MONOTONIC, shared by every process on
the machine). While it runs, this process sends oversized requests: a Generate
prompt of a million token ids (the context is 2,048), a 16 MiB text prompt,
and a Predict of 200,000 one-float tensors. Nothing here asserts a duration:
each request must get INVALID_ARGUMENT naming what was too large, and the
other process must have had calls complete while an oversized request was in
flight, none failed, and more after. The other caller's worst latency before
and during is printed (FIGURE lines) for docs/reliability.md, not asserted.

The daemons are the session's: ``daemon`` (the ``mlp`` model) and
``llm_daemon`` (SmolLM2; the test skips where its GGUF file cannot be had).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest

import edgeinfer
from edgeinfer.client import build_request
from edgeinferd.protocol.wire import MAX_FIELDS
from tests.conftest import Daemon
from tests.reliability_helpers import figure

OTHER_CALLER = """
import json, sys, threading, time
import edgeinfer

stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
calls, errors = [], []
with edgeinfer.Client(sys.argv[1], timeout=60) as client:
    client.health()
    print("ready", flush=True)
    last = False
    while not last:
        last = stop.is_set()  # the call after "stop" starts after the test's last request
        started = time.monotonic()
        try:
            client.health()
        except edgeinfer.EdgeInferError as error:
            errors.append(str(error))
        calls.append((started, time.monotonic()))
print(json.dumps({"calls": calls, "errors": errors}), flush=True)
"""

PREDICT = "/edgeinfer.v1.Inference/Predict"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
GENERATE = "/edgeinfer.v1.Inference/Generate"
#: Oversized requests of each kind, sent one after another.
REPEATS = 3


@dataclass
class Observed:
    calls: list[tuple[float, float]]
    errors: list[str]

    def completed_within(self, windows: list[tuple[float, float]]) -> int:
        """Calls that started and ended inside one of ``windows``."""
        return sum(any(a <= s and e <= b for a, b in windows) for s, e in self.calls)

    def completed_after(self, instant: float) -> int:
        return sum(s >= instant for s, _ in self.calls)

    def worst_ms(self, windows: list[tuple[float, float]] | None = None) -> float:
        """The longest call overlapping ``windows`` (all calls when None)."""
        chosen = [
            e - s
            for s, e in self.calls
            if windows is None or any(s < b and e > a for a, b in windows)
        ]
        return round(max(chosen, default=0.0) * 1000, 1)


@contextmanager
def other_caller(address: str) -> Iterator[list[Observed]]:
    """Run the second process for the block; its record is in the list afterwards."""
    process = subprocess.Popen(
        [sys.executable, "-c", OTHER_CALLER, address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    result: list[Observed] = []
    try:
        assert process.stdout.readline().strip() == "ready"
        yield result
    finally:
        process.stdin.write("stop\n")
        process.stdin.flush()
        record = json.loads(process.stdout.readline())
        process.wait(60)
        result.append(Observed([tuple(c) for c in record["calls"]], record["errors"]))


def oversized(
    address: str, send: Callable[[edgeinfer.Client], object], expected: str
) -> tuple[Observed, list[tuple[float, float]], float]:
    """Send REPEATS oversized requests while the other caller runs.

    Returns its record, the requests' windows (from send to answer) and the end of
    a quiet baseline taken before them.
    """
    with other_caller(address) as record, edgeinfer.Client(address, timeout=120) as client:
        for _ in range(200):  # a baseline for the other caller's figures, counted in calls
            client.health()
        baseline_end = time.monotonic()
        windows = []
        for _ in range(REPEATS):
            started = time.monotonic()
            with pytest.raises(edgeinfer.EdgeInferError) as refused:
                send(client)
            windows.append((started, time.monotonic()))
            assert refused.value.code.name == "INVALID_ARGUMENT", refused.value
            assert expected in str(refused.value), refused.value
        after = windows[-1][1]  # the other caller's last call starts after this
    (observed,) = record
    assert observed.errors == []
    assert observed.completed_within(windows) > 0
    assert observed.completed_after(after) > 0  # and the daemon still answers it
    return observed, windows, baseline_end


def raw_sender(
    channel: grpc.Channel, method: str, data: bytes, streamed: bool = False
) -> Callable[[edgeinfer.Client], None]:
    """A sender of ``data``, serialized beforehand, to ``method`` on a raw channel (its
    answers read to the end when ``streamed``); refusals raise as the client's would."""
    kind = channel.unary_stream if streamed else channel.unary_unary
    call: Any = kind(method, request_serializer=None, response_deserializer=None)

    def send(client: edgeinfer.Client) -> None:
        try:
            answer = call(data, timeout=60)
            if streamed:
                for _ in answer:
                    pass
        except grpc.RpcError as error:
            raise edgeinfer.EdgeInferError.from_rpc(error) from error

    return send


def report(name: str, observed: Observed, windows: list[tuple[float, float]], base: float) -> None:
    baseline = [(s, e) for s, e in observed.calls if e <= base]
    figure(
        name,
        requests=REPEATS,
        answered_in_s=[round(b - a, 3) for a, b in windows],
        other_calls=len(observed.calls),
        other_calls_completed_in_flight=observed.completed_within(windows),
        other_worst_ms_before=round(max((e - s for s, e in baseline), default=0.0) * 1000, 1),
        other_worst_ms_during=observed.worst_ms(windows),
    )


def test_many_tiny_tensors_are_refused_while_another_caller_is_served(daemon: Daemon) -> None:
    """200,000 one-float tensors to a one-input model: refused unparsed, the other caller runs.

    The request's bytes are built once, before the other caller starts, and sent
    through a raw channel: building 200,000 tensors in Python took this process
    seconds of CPU the other two processes then lacked, which had been counted as
    the daemon's stall. The daemon counts the request's fields before protobuf
    parses it and refuses it at the limit (``protocol.wire``).
    """
    message = build_request("mlp", {f"x{i}": np.zeros((1,), np.float32) for i in range(200_000)})
    data = message.SerializeToString()
    with grpc.insecure_channel(daemon.address) as channel:
        observed, windows, base = oversized(
            daemon.address,
            raw_sender(channel, PREDICT, data),
            f"the request has more than {MAX_FIELDS} protobuf fields",
        )
    report("stall.many_tensors", observed, windows, base)


def test_empty_tensors_filling_16_mib_are_refused_while_another_caller_is_served(
    daemon: Daemon,
) -> None:
    """8 million empty KServe V2 input tensors (16 MiB): the kind of field protobuf parses
    slowest, about 0.8 s of the event loop for this one message if it were parsed."""
    data = b"\x0a\x03mlp" + b"\x2a\x00" * (8 << 20)  # model_name, then empty inputs
    with grpc.insecure_channel(daemon.address) as channel:
        observed, windows, base = oversized(
            daemon.address,
            raw_sender(channel, MODEL_INFER, data),
            f"the request has more than {MAX_FIELDS} protobuf fields",
        )
    report("stall.empty_tensors", observed, windows, base)


def test_prompt_far_over_the_context_is_refused_while_another_caller_is_served(
    llm_daemon: Daemon,
) -> None:
    """A million token ids for a 2,048-token context: refused by length, before any copy.

    The request's bytes are built once, before the other caller starts (as below)."""
    from edgeinfer.v1 import inference_pb2

    ids = [1 + i % 1000 for i in range(1_000_000)]  # in the vocabulary: only the length is wrong
    request = inference_pb2.GenerateRequest(
        model="smollm2", tokens=inference_pb2.TokenIds(ids=ids), max_new_tokens=4
    )
    with grpc.insecure_channel(llm_daemon.address) as channel:
        observed, windows, base = oversized(
            llm_daemon.address,
            raw_sender(channel, GENERATE, request.SerializeToString(), streamed=True),
            "the prompt is 1000000 tokens; model 'smollm2' has a context of 2048",
        )
    report("stall.prompt_token_ids", observed, windows, base)


def test_huge_text_prompt_is_refused_while_another_caller_is_served(llm_daemon: Daemon) -> None:
    """16 MiB of text for a 2,048-token context: refused by length before it is tokenized."""
    from edgeinfer.v1 import inference_pb2

    text = "word " * ((16 << 20) // 5)
    request = inference_pb2.GenerateRequest(model="smollm2", text=text, max_new_tokens=4)
    with grpc.insecure_channel(llm_daemon.address) as channel:
        observed, windows, base = oversized(
            llm_daemon.address,
            raw_sender(channel, GENERATE, request.SerializeToString(), streamed=True),
            f"the prompt is {len(text)} characters; model 'smollm2' has a context of 2048",
        )
    report("stall.prompt_text", observed, windows, base)

"""``edgeinfer``: call edgeinferd from the shell.

    edgeinfer models list|show|load|unload [NAME]
    edgeinfer predict MODEL INPUT...        (x.npz, name=x.npy, x.json, or - for JSON on stdin)
    edgeinfer stream MODEL FILE|-           (one message per row of the file, or per stdin line)
    edgeinfer health [MODEL]
    edgeinfer generate MODEL PROMPT|-       (text as it is generated; --json: one object per chunk)
    edgeinfer chat MODEL [QUESTION|-]       (the answer streamed; no question on a terminal: a chat)
    edgeinfer bench MODEL [--concurrency 1,8,32 | --rate N] (throughput and latency under load)

``--json`` prints machine-readable output. Failures exit non-zero with one
line on stderr: ``edgeinfer: NOT_FOUND: model 'x' is not in the repository``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgeinfer.client import (
    DEFAULT_ADDRESS,
    ChatMessage,
    Client,
    EdgeInferError,
    GenerateChunk,
    GenerateEvent,
    GenerateOptions,
    GenerateSummary,
    ModelInfo,
    Stats,
    TlsOptions,
)

EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """The command line or an input file is wrong; exit 2 with the message."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeinfer", description="Call the edgeinferd daemon.")
    parser.add_argument(
        "-a",
        "--address",
        default=os.environ.get("EDGEINFER_ADDRESS", DEFAULT_ADDRESS),
        help="unix:///path.sock, unix:rel.sock or host:port (env EDGEINFER_ADDRESS)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate (PEM) to verify a TCP daemon")
    parser.add_argument("--tls-cert", type=Path, help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--tls-key", type=Path, help="client private key (PEM) for mutual TLS")
    parser.add_argument("--tls-server-name", help="name in the daemon's certificate")
    commands = parser.add_subparsers(dest="command", required=True)

    models = commands.add_parser("models", help="list, show, load or unload models")
    models_commands = models.add_subparsers(dest="action", required=True)
    models_commands.add_parser("list", help="every model and its state")
    for action in ("show", "load", "unload"):
        sub = models_commands.add_parser(action, help=f"{action} one model")
        sub.add_argument("name")

    predict = commands.add_parser("predict", help="one request")
    predict.add_argument("model")
    predict.add_argument(
        "inputs",
        nargs="+",
        help="x.npz (every array by name), NAME=x.npy, x.json ({name: list}) or - (JSON on stdin)",
    )
    predict.add_argument("--version", default="")
    predict.add_argument("--output", type=Path, help="save the outputs to this .npz file")

    stream = commands.add_parser("stream", help="many requests over one stream")
    stream.add_argument("model")
    stream.add_argument(
        "source", help="x.npz or x.npy (one message per row), or - (one JSON object per line)"
    )
    stream.add_argument("--batch-size", type=int, default=1, help="rows per message (files)")
    stream.add_argument("--version", default="")

    health = commands.add_parser("health", help="is the daemon (or a model) serving?")
    health.add_argument("model", nargs="?", default="")

    generate = commands.add_parser("generate", help="stream text from a language model")
    generate.add_argument("model")
    generate.add_argument("prompt", help="the prompt, or - to read it from stdin")
    _sampling_flags(generate, max_new_tokens=64)

    chat = commands.add_parser(
        "chat",
        help="ask a language model (its chat template); no question on a terminal: a conversation",
    )
    chat.add_argument("model")
    chat.add_argument("question", nargs="?", help="one question; - reads it from stdin")
    chat.add_argument("--system", help="a system message before the conversation")
    _sampling_flags(chat, max_new_tokens=512)

    commands.add_parser("stats", help="requests, failures and latency per model")

    from edgeinfer import bench

    bench.add_parser(commands)
    return parser


def _sampling_flags(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The flags generate and chat share (GenerateOptions)."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--top-p", type=float, help="nucleus mass in (0, 1]; default off")
    parser.add_argument("--min-p", type=float, default=0.0, help="in [0, 1); 0: off")
    parser.add_argument("--repetition-penalty", type=float, help="above 1 discourages repeats")
    parser.add_argument("--seed", type=int, help="makes sampling reproducible")
    parser.add_argument(
        "--stop", action="append", default=[], help="end before this text (repeatable)"
    )
    parser.add_argument("--version", default="")


def _options(args: argparse.Namespace) -> GenerateOptions:
    return GenerateOptions(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
        version=args.version,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "bench":
            from edgeinfer import bench

            return bench.main(args, bench.client_factory(args.address, args.timeout, _tls(args)))
        with Client(args.address, timeout=args.timeout, tls=_tls(args)) as client:
            return _run(client, args)
    except EdgeInferError as error:
        print(f"edgeinfer: {error.code.name}: {error.message}", file=sys.stderr)
        return EXIT_FAILED
    except UsageError as error:
        print(f"edgeinfer: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return 0


def _tls(args: argparse.Namespace) -> TlsOptions | None:
    if not (args.tls_ca or args.tls_cert or args.tls_key):
        return None
    try:
        return TlsOptions(
            root_certificates=args.tls_ca.read_bytes() if args.tls_ca else None,
            certificate_chain=args.tls_cert.read_bytes() if args.tls_cert else None,
            private_key=args.tls_key.read_bytes() if args.tls_key else None,
            server_name=args.tls_server_name,
        )
    except OSError as error:
        raise UsageError(f"cannot read TLS file: {error}") from None


def _run(client: Client, args: argparse.Namespace) -> int:
    if args.command == "models":
        return _models(client, args)
    if args.command == "predict":
        info = client.get_model(args.model)
        inputs = _load_inputs(args.inputs, info)
        outputs = client.predict(args.model, inputs, version=args.version)
        if args.output:
            np.savez(args.output, **outputs)  # type: ignore[arg-type]
        _print_outputs(outputs, args.json)
        return 0
    if args.command == "stream":
        info = client.get_model(args.model)
        failures = 0
        for result in client.stream(args.model, _stream_batches(args, info), version=args.version):
            if result.error is not None:
                failures += 1
                line: dict[str, Any] = {
                    "id": result.id,
                    "error": result.error.code.name,
                    "message": result.error.message,
                }
            else:
                assert result.outputs is not None
                line = {"id": result.id, **{k: v.tolist() for k, v in result.outputs.items()}}
            print(json.dumps(line) if args.json else _text_line(line), flush=True)
        return EXIT_FAILED if failures else 0
    if args.command == "generate":
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        _print_generation(client.generate(args.model, prompt, **_options(args)), args.json)
        return 0
    if args.command == "chat":
        return _chat(client, args)
    if args.command == "health":
        status = client.health(args.model)
        print(json.dumps({"service": args.model, "status": status}) if args.json else status)
        return 0 if status == "SERVING" else EXIT_FAILED
    if args.command == "stats":
        _print_stats(client.get_stats(), args.json)
        return 0
    raise UsageError(f"unknown command {args.command!r}")


def _print_stats(stats: Stats, as_json: bool) -> None:
    if as_json:
        from dataclasses import asdict

        print(json.dumps(asdict(stats), indent=2))
        return
    print(
        f"uptime {stats.uptime_seconds:.0f} s, {stats.in_flight} call(s) in flight,"
        f" resident memory {stats.resident_memory_bytes / 2**20:.1f} MiB"
    )
    header = f"{'model':24} {'ver':>4} {'ok':>9} {'failed':>7} {'mean ms':>8} {'queue ms':>9}"
    header += f" {'compute ms':>10} {'rows/batch':>10}"
    print(header)
    for model in stats.models:
        ok = model.requests_by_status.get("OK", 0)
        failed = sum(model.requests_by_status.values()) - ok

        def mean(total: float, count: int = ok) -> str:
            return f"{total / count * 1000:.3f}" if count else "-"

        rows = f"{model.batched_rows / model.batches:.1f}" if model.batches else "-"
        print(
            f"{model.model:24} {model.version:>4} {ok:>9} {failed:>7}"
            f" {mean(model.total_seconds_sum):>8} {mean(model.queue_seconds_sum):>9}"
            f" {mean(model.compute_seconds_sum):>10} {rows:>10}"
        )


def _print_generation(events: Iterable[GenerateEvent], as_json: bool) -> str:
    """Print text as it arrives; the summary goes to stderr (or is the last JSON line).
    Returns the whole text."""
    from dataclasses import asdict

    texts: list[str] = []
    for event in events:
        if isinstance(event, GenerateChunk):
            texts.append(event.text)
        if as_json:
            line = asdict(event)
            if "token_ids" in line:
                line["token_ids"] = list(line["token_ids"])
            print(json.dumps(line), flush=True)
        elif isinstance(event, GenerateSummary):
            print(flush=True)
            print(
                f"[{event.finish_reason}: {event.prompt_tokens} prompt +"
                f" {event.generated_tokens} generated tokens,"
                f" first token {event.time_to_first_token_s * 1000:.1f} ms,"
                f" {event.tokens_per_second:.1f} tokens/s]",
                file=sys.stderr,
            )
        else:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    return "".join(texts)


def _chat(client: Client, args: argparse.Namespace) -> int:
    """One question answered; or, on a terminal with no question, a conversation."""
    history = [ChatMessage("system", args.system)] if args.system else []
    if args.question is not None:
        question = sys.stdin.read() if args.question == "-" else args.question
        history.append(ChatMessage("user", question))
        _print_generation(client.chat(args.model, history, **_options(args)), args.json)
        return 0
    if not sys.stdin.isatty():
        raise UsageError("give a question, or run on a terminal for a conversation")
    print(f"chatting with {args.model}; an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            question = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not question.strip():
            return 0
        history.append(ChatMessage("user", question))
        answer = _print_generation(client.chat(args.model, history, **_options(args)), args.json)
        history.append(ChatMessage("assistant", answer))


def _models(client: Client, args: argparse.Namespace) -> int:
    if args.action == "list":
        models = client.list_models()
        if args.json:
            print(json.dumps([_model_dict(m) for m in models], indent=2))
        else:
            for model in models:
                reason = f"  ({model.reason})" if model.reason else ""
                version = model.serving_version or "-"
                print(f"{model.name:24} {model.state:9} v{version:4}{reason}")
        return 0
    action = {"show": client.get_model, "load": client.load_model, "unload": client.unload_model}
    info = action[args.action](args.name)
    if args.json:
        print(json.dumps(_model_dict(info), indent=2))
    else:
        _print_model(info)
    return 0


def _model_dict(info: ModelInfo) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(info)


def _print_model(info: ModelInfo) -> None:
    print(f"{info.name}: {info.state}" + (f" ({info.reason})" if info.reason else ""))
    if info.serving_version:
        print(f"  serving version {info.serving_version}, max batch size {info.max_batch_size}")
    for label, specs in (("input ", info.inputs), ("output", info.outputs)):
        for spec in specs:
            print(f"  {label} {spec.name}: {spec.dtype}{list(spec.shape)}")
    for version in info.versions:
        size = f", {version.size_bytes / 1024:.1f} KiB" if version.size_bytes else ""
        fmt = f" {version.format}" if version.format else ""
        print(f"  version {version.version}: {version.state}{fmt}{size}")
        if "stage" in version.manifest:
            print(f"    made by stage {version.manifest['stage']!r} of its compression recipe")
        for stage in version.manifest.get("stages", []):
            if isinstance(stage, dict):
                print("    " + _stage_line(stage))


def _stage_line(stage: dict[str, Any]) -> str:
    """One compression stage from a manifest, as the report's table row says it."""
    parts = [f"stage {stage.get('name', '?')}:"]
    if "parameters" in stage:
        parts.append(f"{int(stage['parameters']):,} parameters")
    if "size_bytes" in stage:
        parts.append(f"{stage['size_bytes'] / 1024:.1f} KiB")
    if "accuracy" in stage:
        parts.append(f"accuracy {stage['accuracy'] * 100:.2f}%")
    if "latency_b32_us" in stage:
        parts.append(f"{stage['latency_b32_us']:.0f} us at batch 32")
    return " ".join(parts[:1]) + " " + ", ".join(parts[1:])


def _print_outputs(outputs: dict[str, np.ndarray], as_json: bool) -> None:
    if as_json:
        print(json.dumps({k: v.tolist() for k, v in outputs.items()}))
        return
    for name, array in outputs.items():
        print(f"{name}: {array.dtype}{list(array.shape)}")
        print(np.array2string(array, precision=4, threshold=64))


def _text_line(line: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in line.items())


def _load_inputs(sources: list[str], info: ModelInfo) -> dict[str, np.ndarray]:
    """Read inputs from files; JSON values take the dtype the model declares."""
    dtypes = {spec.name: spec.dtype for spec in info.inputs}
    inputs: dict[str, np.ndarray] = {}
    for source in sources:
        try:
            if source == "-" or source.endswith(".json"):
                text = sys.stdin.read() if source == "-" else Path(source).read_text()
                inputs.update(_from_json(json.loads(text), dtypes))
            elif source.endswith(".npz"):
                with np.load(source, allow_pickle=False) as archive:
                    inputs.update({name: archive[name] for name in archive.files})
            elif "=" in source:
                name, path = source.split("=", 1)
                inputs[name] = np.load(path, allow_pickle=False)
            elif source.endswith(".npy") and len(info.inputs) == 1:
                inputs[info.inputs[0].name] = np.load(source, allow_pickle=False)
            else:
                raise UsageError(f"cannot tell which input {source!r} is: write NAME={source}")
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot read {source}: {error}") from None
    return inputs


def _from_json(value: Any, dtypes: dict[str, str]) -> dict[str, np.ndarray]:
    if isinstance(value, list) and len(dtypes) == 1:
        value = {next(iter(dtypes)): value}
    if not isinstance(value, dict):
        raise UsageError("JSON input must be an object {input name: nested list}")
    return {name: np.asarray(v, dtype=dtypes.get(name)) for name, v in value.items()}


def _stream_batches(args: argparse.Namespace, info: ModelInfo) -> Iterator[dict[str, np.ndarray]]:
    dtypes = {spec.name: spec.dtype for spec in info.inputs}
    if args.source == "-":
        for number, line in enumerate(sys.stdin, 1):
            if line.strip():
                try:
                    yield _from_json(json.loads(line), dtypes)
                except (ValueError, UsageError) as error:
                    raise UsageError(f"stdin line {number}: {error}") from None
        return
    arrays = _load_inputs([args.source], info)
    rows = {len(a) for a in arrays.values()}
    if len(rows) != 1:
        raise UsageError(f"the arrays in {args.source} have different row counts: {sorted(rows)}")
    total = rows.pop()
    for start in range(0, total, args.batch_size):
        yield {name: a[start : start + args.batch_size] for name, a in arrays.items()}


if __name__ == "__main__":
    sys.exit(main())

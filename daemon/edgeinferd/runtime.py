"""Loading an artifact and running its forward pass: the only module that calls torch.

A ``Runner`` turns numpy arrays (in the config's input order) into named numpy
outputs. It is synchronous and thread-safe; the batcher calls it from worker
threads, never from the event loop.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from edgeinferd.batching import pass_clock
from edgeinferd.errors import ConfigError, InvalidInput, ModelExecutionError
from edgeinferd.repository import ModelConfig, TensorSpec, VersionFiles, verify_artifact

# Inputs decoded from request bytes are read-only views; models do not write
# into their inputs, so handing torch the view (no copy) is safe.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

_thread_state = threading.local()


def load_module(files: VersionFiles) -> Any:
    """Load an artifact without unpickling arbitrary objects.

    TorchScript archives and ExportedPrograms carry code in restricted
    formats; a pickled ``nn.Module`` (``torch.save(model)``) is refused.
    """
    verify_artifact(files)
    where = f"{files.folder.parent.name}/{files.version}/{files.artifact.name}"
    try:
        if files.format == "torchscript":
            module = torch.jit.load(str(files.artifact), map_location="cpu")
            module.eval()
            return module
        program = torch.export.load(str(files.artifact))
        return program.module()
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if files.format == "torchscript" and "constants.pkl" in str(error):
            reason = "not a TorchScript archive (pickled modules are refused; use torch.jit.save)"
        raise ConfigError(where, "", f"cannot load {files.format} artifact: {reason}") from None


class Runner:
    """One loaded model version's forward pass, numpy in and numpy out."""

    def __init__(self, config: ModelConfig, module: Any) -> None:
        self.config = config
        self.module = module
        #: (input elements, seconds) of a one-row and of a full-batch warm-up pass.
        self.pass_times: tuple[tuple[int, float], tuple[int, float]] | None = None

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run one forward pass; outputs in the config's order.

        Raises ModelExecutionError if the model raises or returns something
        that does not match its config.
        """
        if getattr(_thread_state, "threads", None) != self.config.threads:
            torch.set_num_threads(self.config.threads)
            _thread_state.threads = self.config.threads
        tensors = (
            (torch.from_numpy(inputs[0]),)
            if len(inputs) == 1
            else [torch.from_numpy(array) for array in inputs]
        )
        try:
            with torch.inference_mode():
                result = self.module(*tensors)
        except Exception as error:
            message = str(error).strip().splitlines()[-1] if str(error).strip() else ""
            if _is_input_guard(error):
                raise InvalidInput(
                    f"model {self.config.name!r} does not take inputs of these shapes: {message}"
                ) from None
            raise ModelExecutionError(
                f"model {self.config.name!r} failed in its forward pass: {type(error).__name__}"
                + (f": {message}" if message else "")
            ) from error
        return self._outputs(result)

    def _outputs(self, result: Any) -> list[np.ndarray]:
        if isinstance(result, torch.Tensor):
            if len(self.config.output_names) == 1:  # the common case, without the general loop
                return [result.detach().contiguous().numpy()]
            values = [result]
        elif isinstance(result, (tuple, list)):
            values = list(result)
        elif isinstance(result, dict):
            missing = [name for name in self.config.output_names if name not in result]
            if missing:
                raise ModelExecutionError(
                    f"model {self.config.name!r} returned no output {missing[0]!r}"
                    f" (it returned {sorted(result)})"
                )
            values = [result[name] for name in self.config.output_names]
        else:
            raise ModelExecutionError(
                f"model {self.config.name!r} returned {type(result).__name__};"
                " expected a tensor, a tuple of tensors or a dict of tensors"
            )
        if len(values) != len(self.config.output_names):
            raise ModelExecutionError(
                f"model {self.config.name!r} returned {len(values)} outputs;"
                f" its config declares {len(self.config.output_names)}"
            )
        arrays = []
        for spec, value in zip(self.config.outputs, values, strict=True):
            if not isinstance(value, torch.Tensor):
                raise ModelExecutionError(
                    f"model {self.config.name!r} output {spec.name!r} is {type(value).__name__},"
                    " not a tensor"
                )
            arrays.append(value.detach().contiguous().numpy())
        return arrays

    def warm_up(self) -> None:
        """Run one pass on zeros so the first real call is not slow, and check
        that what the model returns matches its config."""
        batch = (1,) if self.config.batched else ()
        inputs = [example_input(spec, batch) for spec in self.config.inputs]
        try:
            outputs = self.run(inputs)
        except (ModelExecutionError, InvalidInput) as error:
            raise ConfigError(
                f"{self.config.name}/config.toml", "inputs", f"warm-up failed: {error}"
            ) from None
        for spec, array in zip(self.config.outputs, outputs, strict=True):
            check_output(self.config, spec, array, batch)
        if self.config.inline_max_us > 0:
            self.pass_times = self._inline_pass_times(batch)

    def _inline_pass_times(
        self, batch: tuple[int, ...]
    ) -> tuple[tuple[int, float], tuple[int, float]] | None:
        """The one-row and full-batch pass times, or None when even one row is over
        ``inline_max_us`` (the model never runs inline; a slow model's load is not
        made longer by timing its full batch)."""
        budget = self.config.inline_max_us / 1e6
        small = self._time_pass(batch, over=budget)
        if small[1] > budget:
            return None
        if not self.config.batched:
            return small, small
        return small, self._time_pass((self.config.max_batch_size,))

    def _time_pass(
        self, batch: tuple[int, ...], repeats: int = 7, over: float = float("inf")
    ) -> tuple[int, float]:
        """Input elements and the median seconds of ``repeats`` passes of that size
        (on the clock the batcher times passes with); it stops as soon as most
        passes took longer than ``over``, since the median is then over it too."""
        inputs = [example_input(spec, batch) for spec in self.config.inputs]
        clock = pass_clock(self.config.threads)
        times: list[float] = []
        for _ in range(repeats):
            started = clock()
            self.run(inputs)
            times.append(clock() - started)
            if sum(t > over for t in times) > repeats // 2:
                break
        return sum(int(a.size) for a in inputs), sorted(times)[len(times) // 2]


def _is_input_guard(error: Exception) -> bool:
    """A torch.export program refusing its inputs' shapes (its dynamic-shape constraints).

    The constraints are part of the artifact (e.g. two inputs of equal length,
    a dimension's range), so a call breaking them is the caller's mistake.
    """
    text = str(error)
    return (isinstance(error, AssertionError) and text.startswith("Guard failed:")) or (
        isinstance(error, RuntimeError) and text.startswith("Expected input at")
    )


def example_input(spec: TensorSpec, batch: tuple[int, ...]) -> np.ndarray:
    shape = batch + tuple(1 if dim == -1 else dim for dim in spec.shape)
    return np.zeros(shape, dtype=spec.dtype)


def check_output(
    config: ModelConfig, spec: TensorSpec, array: np.ndarray, batch: tuple[int, ...]
) -> None:
    where = f"{config.name}/config.toml"
    if array.dtype != np.dtype(spec.dtype):
        raise ConfigError(
            where, "outputs", f"output {spec.name!r} is {array.dtype}; the config says {spec.dtype}"
        )
    expected = batch + spec.shape
    matches = len(array.shape) == len(expected) and all(
        e in (-1, a) for e, a in zip(expected, array.shape, strict=True)
    )
    if not matches:
        raise ConfigError(
            where,
            "outputs",
            f"output {spec.name!r} has shape {list(array.shape)} for a warm-up input;"
            f" the config says {list(spec.shape)}"
            + (" after the batch dimension" if batch else ""),
        )


def load_runner(config: ModelConfig, files: VersionFiles) -> Runner:
    """Load, check and warm up one version; ConfigError says why it can't be served."""
    runner = Runner(config, load_module(files))
    runner.warm_up()
    return runner

"""CUDA graphs for the optimised sampler (``generate(impl="graphs")``): steps recorded once, then replayed.

On a GPU one sampling step of a small RQ-Transformer is a few dozen tiny kernels per layer, so the call is
bound by launching them, not by the GPU. :class:`GraphSampler` is a
:class:`~rqvae.models.generate_fast.FastSampler` (same packed weights, same static KV caches, same maths)
whose two kinds of step are recorded the first time they run and replayed afterwards:

- the spatial step at cache slot ``pos`` (all spatial layers): one graph per slot, L + T - 1 of them, so
  every slice of the cache keeps its static shape and no attention mask is needed;
- the depth step at depth ``d`` (all depth layers, the head's LayerNorm and linear): one graph per depth,
  replayed at every position (T times in the first call already).

Inputs go through static buffers (copied in before a replay) and each graph's output is a static tensor,
overwritten by its next replay; the caller consumes it before that. The draw (guidance, temperature,
top-k/p, the generator) and the code-embedding lookups run eagerly between replays, so seeded samples
follow the same random stream as the other samplers.

A GraphSampler is kept per model, batch rows and dtype (:func:`graph_sampler`) and rebuilt when any
parameter or buffer changes (an optimizer step or ``load_state_dict`` bumps its version), so later calls
only replay. The recording itself is a :class:`Recorder`: :class:`CudaGraphRecorder` on CUDA; the tests run
the same bookkeeping with :class:`EagerRecorder` on a CPU (which re-runs the step instead of replaying) in
place of :func:`cuda_recorder`.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn as nn

from rqvae.errors import UserError
from rqvae.models.generate_fast import FastSampler

Step = Callable[[], torch.Tensor]


class Recorder(Protocol):
    def record(self, fn: Step) -> tuple[torch.Tensor, Step]:
        """Run ``fn`` once (its result is returned) and record it: the second element replays it and
        returns its static output tensor."""


class EagerRecorder:
    """Records nothing: a "replay" runs the step again and copies its result into one static output (what
    a graph's replay does to its output), which tests the GraphSampler's bookkeeping without CUDA."""

    def __init__(self) -> None:
        self.recorded = 0

    def record(self, fn: Step) -> tuple[torch.Tensor, Step]:
        self.recorded += 1
        out = fn()
        static = out.clone()

        def replay() -> torch.Tensor:
            return static.copy_(fn())

        return out, replay


class CudaGraphRecorder:
    """torch.cuda.CUDAGraph per step, all in one memory pool (each graph reads only static buffers and the
    caches, and every graph's output stays referenced, so the pool's reuse of freed intermediates is safe in
    any replay order)."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()
        self.recorded = 0

    def record(self, fn: Step) -> tuple[torch.Tensor, Step]:
        self.recorded += 1
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):  # the warm-up (lazy library set-up stays out of the graph) is
            out = fn()  # the step's real run; recording below launches nothing
        torch.cuda.current_stream().wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static = fn()

        def replay() -> torch.Tensor:
            graph.replay()
            return static

        return out, replay


class GraphSampler(FastSampler):
    """A FastSampler for ``rows`` sequences whose spatial and depth steps are recorded and replayed."""

    def __init__(self, model: nn.Module, dt: torch.dtype | None, rows: int, recorder: Recorder) -> None:
        super().__init__(model, dt, rows)
        self.recorder = recorder
        device, C = model.codebook.device, self.config.width
        self.x_in = torch.zeros(rows, C, device=device)  # the spatial step's input (fp32 residual stream)
        self.v_in = torch.zeros(rows, C, device=device)  # the depth step's input
        self.steps: dict[tuple[str, int], Step] = {}

    def _run(self, key: tuple[str, int], buf: torch.Tensor, x: torch.Tensor,
             step: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        buf.copy_(x)
        replay = self.steps.get(key)
        if replay is not None:
            return replay()
        out, self.steps[key] = self.recorder.record(lambda: step(buf))
        return out

    def spatial_step(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        return self._run(("spatial", pos), self.x_in, x, lambda b: FastSampler.spatial_step(self, b, pos))

    def depth_logits(self, v: torch.Tensor, d: int) -> torch.Tensor:
        return self._run(("depth", d), self.v_in, v, lambda b: FastSampler.depth_logits(self, b, d))


def weights_key(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """(storage address, version counter) of every parameter and buffer: changes with any in-place update
    (optimizer step, load_state_dict) and with replaced tensors (``.to()``)."""
    return tuple((t.data_ptr(), t._version) for t in itertools.chain(model.parameters(), model.buffers()))


_SAMPLERS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
KEEP = 2  # GraphSamplers kept per model (e.g. the full batch and a last, smaller one)


def cuda_recorder(device: torch.device) -> Recorder:
    """The recorder of ``generate(impl="graphs")``: CUDA graphs; a one-line UserError off CUDA."""
    if device.type != "cuda":
        raise UserError(f"impl='graphs' records CUDA graphs, but the model is on {device}; "
                        "move it to a GPU or use impl='fast'")
    return CudaGraphRecorder(device)


def graph_sampler(model: nn.Module, dt: torch.dtype | None, rows: int,
                  make_recorder: Callable[[torch.device], Recorder] | None = None) -> GraphSampler:
    """The model's GraphSampler for ``rows`` rows in ``dt``, recorded by earlier calls when the weights are
    unchanged since; otherwise a new one, recorded by ``make_recorder(device)`` (default
    :func:`cuda_recorder`). At most KEEP are kept per model, the least recently used dropped first."""
    kept = _SAMPLERS.setdefault(model, {})
    key, wkey = (rows, dt), weights_key(model)
    entry = kept.pop(key, None)
    if entry is None or entry[0] != wkey:
        recorder = (make_recorder or cuda_recorder)(model.codebook.device)
        entry = (wkey, GraphSampler(model, dt, rows, recorder))
    kept[key] = entry  # most recently used last
    while len(kept) > KEEP:
        kept.pop(next(iter(kept)))
    return entry[1]

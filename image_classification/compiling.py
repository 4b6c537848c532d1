"""``--compile``: torch.compile for training, evaluation and inference, with bounded recompiles.

* Static shapes (``dynamic=False``): every input shape gets its own graph, compiled once and
  reused. A run sees few shapes -- one training batch shape per stage (training drops the last
  incomplete batch), the validation batch and the validation split's last incomplete batch --
  so it compiles once per stage size, never per step. :meth:`Compiler.__init__` raises Dynamo's
  per-function recompile limit to cover those shapes (train and eval mode each count), so a
  stage change always recompiles instead of falling back to eager.
* The compiled wrapper only runs the model: checkpoints, the EMA and exports use the plain
  module, so their keys are an eager run's (no ``_orig_mod.`` prefix).
* DDP: the DDP-wrapped model is compiled (Dynamo splits the graph at DDP's buckets so the
  all-reduce still overlaps the backward pass).
* Compile time is reported separately (``train.compile_time``, ``val.compile_time``): the steps
  during which a graph was compiled count there, not in the throughput.

The graphs are counted by a backend wrapper (:attr:`Compiler.graphs`), the one place that sees
every compilation.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import nn

from image_classification.errors import UserError


def release_graphs() -> None:
    """Drop every compiled graph. Dynamo caches them (with their guards, which hold the compiled
    module -- a DDP model and so its process group) on the model's code objects for the life of
    the interpreter; the end of a run lets them go, so that its process group can be destroyed
    while the interpreter is whole (see ``distributed.shutdown``)."""
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


class Compiler:
    """torch.compile with ``backend`` (``inductor``; ``eager``/``aot_eager`` to test the capture
    quickly) for a run that sees at most ``shapes`` input shapes."""

    def __init__(self, backend: str = "inductor", *, shapes: int = 4):
        import torch._dynamo
        try:
            self._backend = torch._dynamo.lookup_backend(backend)
        except Exception as error:  # noqa: BLE001 - Dynamo raises its own InvalidBackend
            raise UserError(f"--compile {backend}: unknown torch.compile backend "
                            f"(choose from {', '.join(torch._dynamo.list_backends())})") from error
        self.backend = backend
        self.graphs = 0          # graphs compiled so far (every backend call)
        self.seconds = 0.0       # wall time of the steps/batches that compiled them (CompileClock)
        self._wrapped: dict[int, nn.Module] = {}
        # One cache entry per shape and per train/eval mode; twice that, plus Dynamo's own default,
        # so a stage change never hits the limit (which would silently run eager from then on).
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, 2 * shapes + 8)

    def _compile_graph(self, graph_module, example_inputs):
        self.graphs += 1
        return self._backend(graph_module, example_inputs)

    def __call__(self, module: nn.Module) -> nn.Module:
        """The compiled view of ``module`` (made once per module, then reused)."""
        key = id(module)
        if key not in self._wrapped:
            self._wrapped[key] = torch.compile(module, backend=self._compile_graph, dynamic=False)
        return self._wrapped[key]


def plain(module: nn.Module) -> nn.Module:
    """The module a compiled wrapper runs (``module`` itself when it is not compiled)."""
    return getattr(module, "_orig_mod", module)


class CompileClock:
    """Splits a loop's time into compiling steps and the rest: call :meth:`compiled` after each
    step; steps during which ``compiler`` compiled a graph go to :attr:`seconds`, not the throughput."""

    def __init__(self, compiler: Compiler | None):
        self.compiler = compiler
        self.seconds = 0.0
        self._seen = compiler.graphs if compiler else 0

    def compiled(self, elapsed: float) -> bool:
        """Whether the step that took ``elapsed`` seconds compiled a graph (then counted here)."""
        if self.compiler is None or self.compiler.graphs == self._seen:
            return False
        self._seen = self.compiler.graphs
        self.seconds += elapsed
        self.compiler.seconds += elapsed
        return True


def view(compiler: Compiler | None) -> Callable[[nn.Module], nn.Module]:
    """``compiler`` itself, or the identity without --compile."""
    return compiler if compiler is not None else (lambda module: module)

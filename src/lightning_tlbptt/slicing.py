"""Run a layer's forward over its chunk in time slices, so that its widest tensors exist one slice at a time.

Within a chunk of ``k`` steps, a conv layer of a multi-step network computes its input current for all ``k`` steps
at once (``[k, B, C, H, W]``, float), its neuron turns that into spikes of the same size, and a pool shrinks them:
the layer's two widest tensors coexist at full chunk size, although every module in it but the neuron works step by
step, and the neuron carries its state from one call to the next. Once truncation and local losses have removed the
stored activations, those two transients set the peak (AlexNet at ``k = 10``: 40 of 58 MiB).

A :class:`Run` is a stretch of consecutive children of an ``nn.Sequential`` inside one layer that all work step by
step (:func:`steps_independently`: SpikingJelly's multi-step conv, linear, pooling, flatten and dropout layers, a
``SeqToANNContainer`` of such torch modules, and multi-step neurons). While a run is installed
(:func:`installed`), its Sequential walks it in slices of steps: every module of the run gets ``[s, B, ...]``, the
neuron continues from the state the previous slice left, and the run's outputs are concatenated along time. The
forward values are the same as one call over the chunk, step for step; backward walks the slices in reverse, so
the gradients of one slice are all that exist of the layer's width at a time, and they equal the whole call's up
to float summation order (the weight gradient is summed slice by slice).

``s`` comes from a byte size and from the other runs. The first call on a new input shape runs one step and
measures, per step, the run's widest tensor, the sum of the tensors its modules make, and its input and output.
The *finest* slice is ``max(1, slice_bytes // widest)`` steps. A run holds its input and output over the whole
chunk whatever its slices, so its bytes over a chunk of ``k`` steps in slices of ``s`` are about
``k * (input + output) + s * made`` per step's worth; the largest of these over all runs of the network, each at
its finest slice, is the peak slicing can reach. Every run then takes the longest slice that stays within that
peak, at least its finest: the widest layer walks its chunk in slices of ``slice_bytes``, and a narrow layer,
which would not raise the peak whole, runs whole instead of paying for more, smaller calls (AlexNet at
``k = 10``: the same peak, a third of the calls). A run whose chunk fits in one slice runs whole. With
``find_runs(..., coarsen=False)`` every run takes its finest slices instead.

Modules that do not work step by step stop a run: batch normalisation in training (its statistics are over all
``k * B`` samples), ``torch.nn.Dropout`` (a fresh mask per call would differ from SpikingJelly's per-sequence one),
a neuron with ``store_v_seq=True`` (its recorded ``v_seq`` would be the last slice's) and any module this file does
not know. What changes for a user: forward hooks on the modules of a run (SpikingJelly's monitors) fire once per
slice instead of once per chunk.

A Sequential's children are read from its ``_modules``, never by indexing it with a slice: ``nn.Sequential``
answers ``parent[i:j]`` by calling ``type(parent)(...)``, which fails for (or, worse, runs) the constructor of a
user's subclass such as ``class ConvBnSpike(nn.Sequential): def __init__(self, cin, cout)``. Nothing here builds a
module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from spikingjelly.activation_based import base, layer, neuron
from torch import Tensor, nn

from lightning_tlbptt import packing

__all__ = ["Need", "Plan", "Run", "find_runs", "installed", "steps_independently"]

#: torch modules that compute each sample of their input alone and keep no state: in SpikingJelly's multi-step
#: form (``step_mode='m'`` or inside a ``SeqToANNContainer``) each time step is computed alone.
STEPWISE: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Flatten,
    nn.Identity,
)

#: A forward pre-hook with kwargs, ``(module, args, kwargs) -> None | (args, kwargs)``, that a run calls once per
#: call with the whole chunk (the strategy's time cut and block boundary), instead of once per slice.
PreHook = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], Any]


def steps_independently(module: nn.Module) -> bool:
    """Whether ``module``, called on ``[T, B, ...]``, gives the same steps when called on consecutive time slices."""
    if isinstance(module, neuron.BaseNode):
        return module.step_mode == "m" and not getattr(module, "store_v_seq", False)
    if isinstance(module, layer.Dropout):  # one mask per sequence, kept in its memory until reset
        return module.step_mode == "m"
    if isinstance(module, layer.SeqToANNContainer):
        return all(isinstance(m, STEPWISE) for m in _children(module))
    return isinstance(module, base.StepModule) and module.step_mode == "m" and isinstance(module, STEPWISE)


@dataclass(frozen=True)
class Need:
    """What a run holds while it walks a chunk, in bytes per time step (measured on one step).

    Attributes:
        held: its input and output, held over the whole chunk whatever the slices.
        made: every tensor its modules make, summed (what exists per step of a slice).
        finest: its finest slice, ``max(1, slice_bytes // widest)`` steps.
    """

    held: int
    made: int
    finest: int

    def bytes(self, chunk: int, steps: int) -> int:
        """About what the run holds over a chunk of ``chunk`` steps walked in slices of ``steps``."""
        return chunk * self.held + min(steps, chunk) * self.made


class Plan:
    """The runs of one network and what each needs: a run is cut no finer than the peak the finest cuts leave.

    Args:
        coarsen: ``True`` (default) lets a run take longer slices than its finest where the peak allows;
            ``False`` walks every run in its finest slices.
    """

    def __init__(self, coarsen: bool = True) -> None:
        self.coarsen = coarsen
        self.needs: dict[int, Need] = {}  # per run (id), its last measurement

    def steps(self, run: Run, need: Need, chunk: int) -> int:
        """The longest slice of ``run`` over a chunk of ``chunk`` steps within the peak, at least its finest."""
        self.needs[id(run)] = need
        if not self.coarsen:
            return need.finest
        peak = max(other.bytes(chunk, other.finest) for other in self.needs.values())
        return max(need.finest, (peak - chunk * need.held) // max(need.made, 1))


class Run:
    """Consecutive children ``parent[start:stop]`` of a Sequential, walked in time slices.

    Args:
        parent, start, stop: where the run is.
        slice_bytes: the widest tensor of its finest slice (:class:`Need`).
        plan: shared with the network's other runs, which then set how far a slice may grow (:class:`Plan`);
            by default one of its own, so that a run alone takes its finest slices.

    Attributes:
        before: pre-hooks of the first module that must see the whole chunk (see :data:`PreHook`).
        readout: a step-wise module (the local classifier of the block the run ends) applied to every slice of
            the run's output as it is made, collected by :meth:`take_readout`: its backward then reaches the run
            slice by slice, instead of as one gradient the size of the run's output over the chunk.
    """

    def __init__(
        self, parent: nn.Sequential, start: int, stop: int, slice_bytes: int, plan: Plan | None = None
    ) -> None:
        self.parent, self.start, self.stop = parent, start, stop
        self.modules = _children(parent)[start:stop]
        self.slice_bytes = slice_bytes
        self.plan = plan if plan is not None else Plan()
        self.before: list[PreHook] = []
        self.readout: nn.Module | None = None
        self._read: list[Tensor] = []
        self.needs: dict[tuple[Any, ...], Need] = {}  # per per-step input shape, dtype and device

    @property
    def names(self) -> str:
        return f"{type(self.parent).__name__}[{self.start}:{self.stop}]"

    @property
    def following(self) -> nn.Module | None:
        """The child of :attr:`parent` after the run (what its output feeds), ``None`` at the Sequential's end."""
        children = _children(self.parent)
        return children[self.stop] if self.stop < len(children) else None

    def __call__(self, x: Any) -> Any:
        args: tuple[Any, ...] = (x,)
        kwargs: dict[str, Any] = {}
        for hook in self.before:
            result = hook(self.modules[0], args, kwargs)
            if result is not None:
                args, kwargs = result
        if kwargs or len(args) != 1:
            raise RuntimeError(f"a pre-hook of {self.names} changed its call to {len(args)} args and {kwargs}")
        (x,) = args
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] < 2:
            return self._read_out(self._walk(x))
        steps_total = x.shape[0]
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        need = self.needs.get(key)
        steps = self.plan.steps(self, need, steps_total) if need is not None else None
        if steps is not None and steps >= steps_total:
            return self._read_out(self._walk(x))
        outputs: list[Tensor] = []
        whole: Tensor | None = None  # with a readout: the output, filled slice by slice
        # One split node hands out the slices: its backward puts their gradients together once, where slicing
        # with x[begin:end] would make a zero-filled gradient of the whole input per slice. A new shape first runs
        # one step alone, to measure the run.
        pieces = list(x.split(steps)) if steps is not None else list(x.split([1, steps_total - 1]))
        begin = 0
        while pieces:
            piece = pieces.pop(0)
            end = begin + piece.shape[0]
            made: list[int] | None = [] if steps is None else None
            y = self._walk(piece, made)
            if not isinstance(y, Tensor) or y.dim() < 1 or y.shape[0] != end - begin:
                raise RuntimeError(
                    f"{self.names} returned {_describe(y)} for {end - begin} time step(s): it does not keep time as "
                    "its first axis, so it cannot be run in time slices. Pass TruncatedLocalBPTT(slice_bytes=None) "
                    "to run every layer whole."
                )
            if steps is None:
                need = self.needs[key] = self._need(piece, y, made or [0])
                steps = self.plan.steps(self, need, steps_total)
                pieces = list(pieces[0].split(steps))
            if self.readout is None:
                outputs.append(y)
            else:
                if whole is None:
                    whole = y.new_empty((steps_total, *y.shape[1:]))
                # the readout saves what it reads: give it the output's own memory rather than a second copy
                part = _alias(whole, begin, end, y)
                if packing.is_marked(y):
                    packing.mark(part, f"{self.names} (time slices of spikes)")
                self._read.append(self.readout(_SameGradient.apply(y, part)))
                outputs.append(part)
            del y, piece
            begin = end
        if whole is None:
            whole = torch.cat(outputs)
        if all(packing.is_marked(out) for out in outputs):  # spikes, slice by slice: so is their concatenation
            packing.mark(whole, f"{self.names} (time slices of spikes)")
        return whole

    def take_readout(self) -> Tensor | None:
        """What :attr:`readout` made of the last call's output, slice by slice, concatenated; then forgotten."""
        if not self._read:
            return None
        read, self._read = self._read, []
        return read[0] if len(read) == 1 else torch.cat(read)

    def _walk(self, x: Any, measured: list[int] | None = None) -> Any:
        """The run's modules on ``x``; ``measured`` collects the bytes of every tensor they make."""
        for module in self.modules:
            x = module(x)
            if measured is not None and isinstance(x, Tensor):
                measured.append(_nbytes(x))
        return x

    def _need(self, step: Tensor, y: Tensor, made: list[int]) -> Need:
        """What the run holds per step, from the walk of the one step ``step`` that gave ``y`` and made ``made``."""
        return Need(held=_nbytes(step) + _nbytes(y), made=sum(made), finest=max(1, self.slice_bytes // max(made)))

    def _read_out(self, y: Any) -> Any:
        if self.readout is not None:
            self._read.append(self.readout(y))
        return y


class _SameGradient(torch.autograd.Function):
    """``part`` in the forward, ``y``'s place in backward: ``part`` holds ``y``'s values in other memory."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, part: Tensor) -> Tensor:
        return part.view_as(part)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _alias(whole: Tensor, begin: int, end: int, y: Tensor) -> Tensor:
    """``whole[begin:end]`` filled with ``y``, as a tensor of its own (own version counter) on ``whole``'s memory.

    A view would share ``whole``'s version counter, which the next slice's write bumps, and autograd would then
    refuse the values the readout saved; no slice's memory is written twice, so they stay what was saved.
    """
    view = whole[begin:end]
    view.copy_(y.detach())
    part = torch.empty(0, dtype=whole.dtype, device=whole.device)
    return part.set_(whole.untyped_storage(), view.storage_offset(), view.shape, view.stride())


class _SlicedSequential:
    """``nn.Sequential.forward`` with its runs walked in slices; a callable object so that the network pickles."""

    def __init__(self, parent: nn.Sequential, runs: Sequence[Run]) -> None:
        self.parent = parent
        self.runs = {run.start: run for run in runs}

    def __call__(self, input: Any) -> Any:
        children = _children(self.parent)
        i = 0
        while i < len(children):
            run = self.runs.get(i)
            if run is None:
                input = children[i](input)
                i += 1
            else:
                input = run(input)
                i = run.stop
        return input


def find_runs(
    net: nn.Module, layers: Sequence[Sequence[nn.Module]], slice_bytes: int, *, coarsen: bool = True
) -> list[Run]:
    """The runs of ``net``: maximal stretches of step-wise Sequential children within one layer, with a neuron.

    ``layers``: the modules of each layer in execution order (:attr:`lightning_tlbptt.partitioning.Layer.modules`).
    A module called more than once per forward, or a Sequential whose class has its own ``forward``, is never
    part of a run. The runs share one ``Plan(coarsen)``: with ``coarsen=False`` every run walks its finest
    slices, not only the widest.
    """
    plan = Plan(coarsen)
    where: dict[int, tuple[nn.Sequential, int]] = {}
    for parent in net.modules():
        if isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward:
            for index, child in enumerate(_children(parent)):
                where[id(child)] = (parent, index)
    calls: dict[int, int] = {}
    for modules in layers:
        for module in modules:
            calls[id(module)] = calls.get(id(module), 0) + 1
    runs: list[Run] = []
    for modules in layers:
        stretch: list[tuple[nn.Sequential, int, nn.Module]] = []
        for module in (*modules, None):
            place = where.get(id(module)) if module is not None else None
            fits = place is not None and calls[id(module)] == 1 and steps_independently(module)
            if fits and stretch and (place[0] is stretch[-1][0] and place[1] == stretch[-1][1] + 1):
                stretch.append((*place, module))
                continue
            if len(stretch) > 1 and any(isinstance(m, neuron.BaseNode) for _, _, m in stretch):
                runs.append(Run(stretch[0][0], stretch[0][1], stretch[-1][1] + 1, slice_bytes, plan))
            stretch = [(*place, module)] if fits else []
    return runs


@contextmanager
def installed(runs: Sequence[Run]) -> Iterator[None]:
    """Walk ``runs`` in slices while the context is active (their Sequentials' ``forward`` overridden per instance).

    On exit each run forgets its :attr:`Run.before` hooks, its :attr:`Run.readout` and what that read.
    """
    parents: dict[int, tuple[nn.Sequential, list[Run]]] = {}
    for run in runs:
        parents.setdefault(id(run.parent), (run.parent, []))[1].append(run)
    try:
        for parent, own in parents.values():
            parent.forward = _SlicedSequential(parent, own)  # type: ignore[method-assign]
        yield
    finally:
        for parent, _ in parents.values():
            vars(parent).pop("forward", None)
        for run in runs:  # hooks, readout and readouts belong to one installation
            run.before.clear()
            run.readout = None
            run._read.clear()


def _children(parent: nn.Sequential) -> tuple[nn.Module, ...]:
    """``parent``'s children in the order ``nn.Sequential.forward`` calls them, read from ``_modules``: indexing
    with a slice would rebuild ``parent`` through its class's constructor (see the module docstring)."""
    return tuple(parent._modules.values())


def _nbytes(x: Tensor) -> int:
    """Bytes per time step of ``[T, ...]``."""
    return x.numel() * x.element_size() // max(x.shape[0], 1)


def _describe(value: Any) -> str:
    return f"a tensor of shape {list(value.shape)}" if isinstance(value, Tensor) else type(value).__name__

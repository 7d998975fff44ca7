"""The time cut and the block boundaries, installed as hooks in the user's network for one batch.

- **Time.** A hook on the network's entry (the first module it calls, which receives SpikingJelly's time-major
  ``[T, B, ...]``) passes on the chunk's steps ``x[start:stop]`` only, so whatever the user's ``forward`` does before
  (transposes, encoders, repeating a static image over ``T``) runs unchanged. It records ``T``.
- **Blocks.** At each block boundary a hook reads the tensor the next block receives, feeds it to the block's local
  classifier, back-propagates the local loss at once (:meth:`BatchState.add_loss`: the block's graph is freed before
  the next block runs) and hands the next block a detached copy, so no gradient crosses the boundary. A layer run in
  time slices (:mod:`~lightning_tlbptt.slicing`) whose output feeds a boundary reads it out slice by slice instead.
  Single-step networks (``step_mode='s'``) collect one readout a step; their loss is taken at the chunk's end
  (:func:`finish_chunk`).

A cut module called more than once per network call (a shared block) is cut at the call the probe chose
(``Cut.occurrence``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from spikingjelly.activation_based import neuron
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_tlbptt import slicing
from lightning_tlbptt.batch import BatchState
from lightning_tlbptt.losses import LocalLoss
from lightning_tlbptt.partitioning import Cut, Partition

__all__ = ["finish_chunk", "installed", "is_spiking_output"]

NoteSpikes = Callable[[str, Tensor], None]
"""``(who, spikes [..., C])``: tells the silence check which output neurons fired."""


@contextmanager
def installed(
    net: nn.Module,
    partition: Partition,
    classifiers: nn.ModuleList,
    runs: list[slicing.Run],
    state: BatchState,
    loss_fn: LocalLoss,
    note_spikes: NoteSpikes,
    *,
    cut_time: bool,
    output_spikes: bool,
) -> Iterator[None]:
    """Install the time cut (``cut_time``) and the block boundaries on ``net`` for one batch; always removed after."""
    per_step = partition.step_mode == "s"
    calls = state.calls

    def start_of_call(_: nn.Module, args: tuple[Any, ...]) -> None:
        calls.clear()

    def end_of_call(_: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, Tensor):
            note_spikes("the network's output layer", output)

    def occurrence(cut: Cut) -> bool:
        seen = calls.get(id(cut.module), 0)
        calls[id(cut.module)] = seen + 1
        return seen == cut.occurrence

    def entry(cut: Cut, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not occurrence(cut):
            return None
        x = args[0]
        if state.seen_T is None:
            state.seen_T = x.shape[0]
        start, stop = state.window
        return (x[start:stop], *args[1:]), kwargs

    def boundary(index: int, cut: Cut, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not occurrence(cut):
            return None
        args, kwargs, h = _take_tensor(args, kwargs)
        run = reading.get(index)
        readout = run.take_readout() if run is not None else None
        if readout is None:
            readout = classifiers[index](h.unsqueeze(0) if per_step else h)
        if per_step:
            state.readouts[index].append(readout)
        else:
            state.add_loss(index, loss_fn(readout, state.target))
            note_spikes(f"the local classifier of block {index}", readout)
        return _put_tensor(args, kwargs, h.detach())

    handles: list[RemovableHandle] = [net.register_forward_pre_hook(start_of_call)]
    if output_spikes:
        handles.append(net.register_forward_hook(end_of_call))
    # a hook on the first module of a run must see the whole chunk, not each slice: the run calls it
    first_of_run = {id(run.modules[0]): run for run in runs}
    # a run whose output goes straight into the next block reads it out slice by slice (slicing.Run.readout)
    feeding = {id(run.following): run for run in runs if run.following is not None}
    reading: dict[int, slicing.Run] = {}
    for block in partition.blocks[1:]:
        assert block.start is not None
        run = feeding.get(id(block.start.module))
        if run is not None and block.start.occurrence == 0 and not per_step:
            run.readout = classifiers[block.index - 1]
            reading[block.index - 1] = run

    def install(module: nn.Module, hook: slicing.PreHook, prepend: bool = False) -> None:
        run = first_of_run.get(id(module))
        if run is not None:
            run.before.insert(0, hook) if prepend else run.before.append(hook)
        else:
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True, prepend=prepend))

    if cut_time and partition.entry is not None:
        install(partition.entry.module, _bind(entry, partition.entry), prepend=True)
    for block in partition.blocks[1:]:
        assert block.start is not None
        install(block.start.module, _bind(boundary, block.index - 1, block.start))
    try:
        with slicing.installed(runs):
            yield
    finally:
        for handle in handles:
            handle.remove()


def finish_chunk(state: BatchState, loss_fn: LocalLoss, note_spikes: NoteSpikes) -> None:
    """Single-step networks: one local loss per block over the readouts of the chunk's steps."""
    for i, steps in enumerate(state.readouts):
        if steps:
            readout = torch.cat(steps)
            state.add_loss(i, loss_fn(readout, state.target))
            note_spikes(f"the local classifier of block {i}", readout)
            steps.clear()


def is_spiking_output(partition: Partition) -> bool:
    """The network's output is spikes when the last module its output layer runs is a neuron."""
    return isinstance(partition.layers[-1].modules[-1], neuron.BaseNode)


def _bind(fn: Callable[..., Any], *bound: Any) -> Callable[..., Any]:
    def hook(*args: Any) -> Any:
        return fn(*bound, *args)

    return hook


def _take_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any], Tensor]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return args, kwargs, value
    raise RuntimeError("a block boundary received no tensor")  # the probe chose this cut for its one tensor


def _put_tensor(args: tuple[Any, ...], kwargs: dict[str, Any], h: Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    for i, value in enumerate(args):
        if isinstance(value, Tensor):
            return (*args[:i], h, *args[i + 1 :]), kwargs
    key = next(key for key, value in kwargs.items() if isinstance(value, Tensor))
    return args, {**kwargs, key: h}

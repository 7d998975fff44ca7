"""``k='auto'``: training chunks measured on the real device, and the first batch's peak checked against the budget.

:func:`choose_k` hands :func:`lightning_tlbptt.budget.choose_k` a function that measures the peak bytes of one
training chunk of ``k`` steps (the network's forward with its block boundaries, the local losses and a stand-in for
the user's loss back-propagated) and leaves no trace: weights, BatchNorm statistics, gradients, random streams and
neuron states are as before. The chunk measured is a second one, as every chunk of training but the first: it starts
with every layer's neuron states alive, where a first chunk makes a layer's states only when it reaches that layer
(on the AlexNet benchmark at ``k = 1`` that was 2.6 MiB of 19, more than the budget's margin).

:func:`checking_budget` wraps the first batch after ``k`` was chosen and warns if its real peak exceeded the budget
(CUDA: ``max_memory_allocated``; CPU: every live tensor plus what was allocated before the batch).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_tlbptt import budget, cuts, packing
from lightning_tlbptt.batch import BatchState, batch_size
from lightning_tlbptt.checks import local_target
from lightning_tlbptt.chunks import ChunkLoop
from lightning_tlbptt.memory import TensorMemoryMeter, training_state, training_state_bytes
from lightning_tlbptt.partitioning import _first_tensor
from lightning_tlbptt.probe import forked_random_streams

__all__ = ["checking_budget", "choose_k"]


def choose_k(strategy: Any, loop: ChunkLoop, batch: Any) -> int:
    """The largest ``k`` whose measured chunks fit ``strategy.memory_budget``; agreed over ranks (the smallest)."""
    steps = loop.probed.T
    assert steps is not None and strategy.memory_budget is not None  # a network time split saw T
    optimizer = strategy.optimizers[0]
    k, model = budget.choose_k(
        functools.partial(_measure_chunk, loop, batch, optimizer),
        steps,
        strategy.memory_budget,
        batch_size=batch_size(batch),
        state_bytes=training_state_bytes(loop.module.parameters(), optimizer),
    )
    if strategy.world_size > 1:  # every rank must step as often as the others
        agreed = torch.tensor([k], device=loop.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        k = int(agreed)
    strategy.memory_model = model
    rank_zero_info(
        f"TruncatedLocalBPTT(k='auto'): k={k} of T={steps} fits memory_budget="
        f"{budget.format_bytes(strategy.memory_budget)}: predicted {budget.format_bytes(model(k))} "
        f"({budget.format_bytes(model.fixed)} + {budget.format_bytes(model.per_step)} per step, measured "
        + ", ".join(f"k={m}: {budget.format_bytes(b)}" for m, b in model.measured)
        + ")"
    )
    return k


def _measure_chunk(loop: ChunkLoop, batch: Any, optimizer: torch.optim.Optimizer, k: int) -> int:
    device = loop.device
    to_device = functools.partial(apply_to_collection, dtype=Tensor, function=lambda t: t.to(device))
    args, kwargs, batch = to_device(loop.probed.args), to_device(loop.probed.kwargs), to_device(batch)
    module = loop.module
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    cuda = device.type == "cuda"
    state = BatchState(len(loop.classifiers), loop.gradients, device)
    steps = loop.probed.T or k
    try:
        with (
            forked_random_streams(device),
            cuts.installed(
                loop.net,
                loop.probed.partition,
                loop.classifiers,
                loop.probed.runs,
                state,
                loop.loss_fn,
                lambda who, spikes: None,
                cut_time=True,
                output_spikes=False,
            ),
        ):
            state.target = (
                local_target(
                    batch, 0, loop.probed.partition.num_classes, loop.target, device, label_free=loop.label_free
                )
                if len(loop.classifiers)
                else None
            )
            loop.streams.start_batch()
            second = (k, 2 * k) if 2 * k <= steps else (0, k)
            with TensorMemoryMeter() as live:
                for window in (0, k), second:
                    # the measured chunk starts with what the first left alive: every layer's neuron states
                    live.peak_bytes = live.current_bytes
                    if cuda:
                        torch.cuda.synchronize(device)
                        torch.cuda.reset_peak_memory_stats(device)
                    loop.streams.start_chunk()
                    state.window, state.seen_T = window, None
                    with packing.binary_saved_tensors(module, bits=loop.pack_spikes):
                        out = _first_tensor(loop.net(*args, **kwargs))
                        assert out is not None
                        out.float().sum().backward()  # stands in for the user's loss on the last block
                    del out
                    loop.gradients.clear()
                    module.zero_grad(set_to_none=True)  # as the optimizer step leaves them
                    loop.classifiers.zero_grad(set_to_none=True)
                    loop.streams.end_chunk()
            # the optimizer's state is not allocated before its first step: counted as it will be
            held = training_state(module.parameters(), optimizer)
            if cuda:
                return torch.cuda.max_memory_allocated(device) + held.optimizer_state
            return live.peak_bytes + held.params + held.optimizer_state
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(buffers[name])
        module.zero_grad(set_to_none=True)
        loop.classifiers.zero_grad(set_to_none=True)
        loop.gradients.clear()
        loop.streams.end_batch()
        loop.silence.take_flags()


@contextmanager
def checking_budget(strategy: Any, loop: ChunkLoop) -> Iterator[None]:
    """Around the first batch after ``k`` was chosen: its real peak against the budget."""
    if strategy.memory_budget is None:
        yield
        return
    device = loop.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    optimizer = strategy.optimizers[0]
    before = training_state(loop.module.parameters(), optimizer)
    allocated = before.params + (before.optimizer_state if optimizer.state else 0)
    with TensorMemoryMeter() as live:
        yield
    assert strategy.memory_model is not None and isinstance(strategy.k, int)
    used = torch.cuda.max_memory_allocated(device) if cuda else live.peak_bytes + allocated
    strategy.memory_used = used
    if used > strategy.memory_budget:
        rank_zero_warn(
            f"the first batch at k={strategy.k} used {budget.format_bytes(used)}, over memory_budget="
            f"{budget.format_bytes(strategy.memory_budget)} (predicted "
            f"{budget.format_bytes(strategy.memory_model(strategy.k))}): your training_step's loss or the allocator "
            "keeps more than the measured chunk. Lower memory_budget or pass a smaller k."
        )

"""The chunk loop: Algorithm 1 of Guo et al. (2023) as Lightning's own automatic optimisation, once per chunk.

Lightning 1.x's ``truncated_bptt_steps`` ran the module's ``training_step`` once per time split of a batch, with an
optimizer step after each; :class:`ChunkLoop` keeps that contract. Per batch:

1. The batch's random streams (torch, CUDA, numpy, Python) are saved, and the neuron states start fresh
   (:class:`~lightning_tlbptt.states.StateStreams`).
2. Per chunk of ``k`` steps: the random streams are put back to the batch's start (every chunk draws the same
   augmentation, the same encoder spikes), the chunk gets the batch as the loader gave it (a step that edited it in
   place gets a fresh copy), the neuron states continue the previous chunk's, per network call, detached. Then
   Lightning's automatic optimisation runs as it runs per batch in plain Lightning: the training step in a closure
   (with the block boundaries' local losses back-propagated inside the network's forward, :mod:`~.cuts`),
   ``on_before_zero_grad``/``optimizer_zero_grad``, ``backward`` (local gradients added, :mod:`~.batch`), the
   module's ``optimizer_step`` with the closure, gradient clipping, the step counters. ``global_step`` therefore
   counts chunks.
   With ``step_every="batch"`` (not Algorithm 1) the chunks' gradients are averaged instead and Lightning's
   optimisation runs once, after the last chunk (:meth:`ChunkLoop.run`).
3. After the batch the streams continue from where the last chunk left them (one batch's draws, as in plain
   Lightning), and the neuron states are freed.

The time cut is made where the network receives the time axis (its entry: a network split) or, for single-step
networks whose time loop lives in the training step, in the batch (:meth:`ChunkLoop.split_batch`).
``k = T`` with one block is exactly plain Lightning.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from spikingjelly.activation_based import base
from torch import Tensor, nn
from torch._dynamo import OptimizedModule  # torch.compile's wrapper; Lightning imports it from here too

from lightning_tlbptt import cuts, packing
from lightning_tlbptt.batch import BatchState, LocalGradients, tensors
from lightning_tlbptt.checks import SilenceCheck, local_target
from lightning_tlbptt.layout import time_chunks
from lightning_tlbptt.losses import LocalLoss, rate_cross_entropy, rate_mse
from lightning_tlbptt.probe import Probe, explain_cut_batch, versions_of
from lightning_tlbptt.states import StateStreams

__all__ = ["ChunkLoop", "Split", "StepEvery", "split_along_time"]

Split = Literal["network", "batch"]
StepEvery = Literal["chunk", "batch"]


class _RandomStreams:
    """Every random stream a step may draw from, saved once and put back on demand."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device if device.type == "cuda" else None
        self.torch = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(self.cuda) if self.cuda is not None else None
        self.numpy = np.random.get_state()
        self.python = random.getstate()

    def restore(self) -> None:
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda_state, self.cuda)
        np.random.set_state(self.numpy)
        random.setstate(self.python)


class ChunkLoop:
    """Runs one fit's batches chunk by chunk over the probed network (see the module docstring).

    Args:
        module: the user's LightningModule.
        net: its spiking network.
        probed: what the probe found (partition, slices).
        classifiers: the local classifiers, one per block but the last.
        k: time steps per chunk.
        split: ``"network"`` cuts at the network's entry, ``"batch"`` cuts the batch (``split_batch``).
        split_batch: ``(batch, k) -> chunks`` for the batch split.
        loss_fn: the local classifiers' loss.
        target: ``batch -> target`` for the local classifiers, or ``None`` for the default.
        silence: the silence check.
        pack_spikes: save spikes for backward as bits.
        device: the device the batch is on.
        scale: the precision plugin's loss scaling, for the local losses.
        stop: whether training must stop now (``max_steps`` reached), asked after each chunk.
        retain_graphs: keep each block's graph after its local backward
            (:class:`~lightning_tlbptt.batch.LocalGradients`).
        step_every: ``"chunk"`` (Algorithm 1) or ``"batch"``: every chunk's training step and backward run with
            their gradients held, and Lightning's optimisation runs once, after the last chunk, on their mean
            (:meth:`run`).
    """

    def __init__(
        self,
        module: pl.LightningModule,
        net: nn.Module,
        probed: Probe,
        classifiers: nn.ModuleList,
        *,
        k: int,
        split: Split,
        split_batch: Callable[[Any, int], list[Any]],
        loss_fn: LocalLoss,
        target: Callable[[Any], Tensor] | None,
        silence: SilenceCheck,
        pack_spikes: bool,
        device: torch.device,
        scale: Callable[[Tensor], Tensor] | None = None,
        stop: Callable[[], bool] = lambda: False,
        retain_graphs: bool = False,
        step_every: StepEvery = "chunk",
    ) -> None:
        self.module, self.net, self.probed, self.classifiers = module, net, probed, classifiers
        self.step_every = step_every
        self.k, self.split, self.split_batch = k, split, split_batch
        self.loss_fn, self.target, self.silence = loss_fn, target, silence
        self.label_free = loss_fn not in (rate_mse, rate_cross_entropy)  # the user's own loss may need no label
        self.pack_spikes, self.device, self.stop = pack_spikes, device, stop
        memory = [m for owner in (net, classifiers) for m in owner.modules() if isinstance(m, base.MemoryModule)]
        self.streams = StateStreams(memory)
        trainable = [p for owner in (module, classifiers) for p in owner.parameters() if p.requires_grad]
        self.gradients = LocalGradients(list({id(p): p for p in trainable}.values()), scale, retain_graphs)
        self.output_spikes = cuts.is_spiking_output(probed.partition)
        self.compiled = any(
            isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None
            for m in module.modules()
        )
        self.state: BatchState | None = None
        self.chunks_seen: int | None = None
        """Chunks the last batch had."""
        self.edits_batch = probed.edits_batch
        """The step edits its batch in place: chunks after the first get a copy of the batch as the loader gave it."""

    def close(self) -> None:
        """After the fit: resets are the modules' own again, every state freed."""
        self.streams.uninstall()
        for m in self.streams.modules:
            type(m).reset(m)

    def run(
        self,
        run_one: Callable[[dict[str, Any]], dict[str, Any]],
        batch_idx: int,
        kwargs: dict[str, Any],
        skip_backward: bool = False,
        hold_one: Callable[[dict[str, Any]], Any] | None = None,
    ) -> dict[str, Any]:
        """One batch: ``run_one(kwargs)`` (Lightning's automatic optimisation) once per chunk.

        With ``step_every="batch"``, ``hold_one(kwargs)`` runs each chunk instead (the training step, its loss's
        gradients held with the local ones, no optimizer), then ``run_one`` runs once on the last chunk with
        :attr:`BatchState.replay` set: the training step hands back the last chunk's output instead of running
        again, and the step's backward adds the chunks' mean gradient (as Lightning's gradient accumulation
        averages over its batches). So the optimizer, zero_grad, the backward hooks and the
        step counters run once per batch, as in plain Lightning; the training step runs once per chunk.

        ``skip_backward``: a forward-only batch (no local loss is back-propagated)."""
        batch = kwargs["batch"]
        state = BatchState(
            len(self.classifiers), self.gradients, self.device, skip_backward=skip_backward, batch_idx=batch_idx
        )
        self.state = state
        randomness = _RandomStreams(self.device)
        pristine = _copy_if_chunked(batch, self)
        output: Any = {}
        hold = self.step_every == "batch" and not skip_backward and hold_one is not None
        self.streams.start_batch()
        try:
            with ExitStack() as stack:
                stack.enter_context(self._installed(state))
                for index, chunk in enumerate(self._chunks(batch, pristine, state)):
                    state.chunk = index
                    if index:
                        randomness.restore()
                    if len(self.classifiers) and (index == 0 or self.split == "batch"):
                        state.target = local_target(
                            chunk,
                            batch_idx,
                            self.probed.partition.num_classes,
                            self.target,
                            self.device,
                            label_free=self.label_free,
                        )
                    self.streams.start_chunk()
                    state.seen_T = None if self.split == "network" else state.seen_T
                    if not (hold and index):  # held gradients add up over a batch's chunks
                        self.gradients.clear()
                        if not skip_backward:  # a forward-only batch leaves the gradients as Lightning leaves them
                            self.gradients.free_step_gradients()
                    try:
                        output = (hold_one if hold else run_one)({**kwargs, "batch": chunk})  # type: ignore[misc]
                    except Exception as err:
                        self._explain(err, state)
                        raise
                    self.streams.end_chunk()
                    if not hold and self.stop():  # max_steps counts optimizer steps: it can fall inside a batch
                        break
                if hold:
                    self.gradients.average(index + 1)
                    state.replaying, state.replay = True, output
                    output = run_one({**kwargs, "batch": chunk})
            self.chunks_seen = index + 1
        finally:
            self.streams.end_batch()
            self.gradients.clear()
            self.state = None
        return output

    def _explain(self, err: Exception, state: BatchState) -> None:
        if self.split == "batch" and state.seen_T not in (None, 1):
            explain_cut_batch(err, self.k, f"chunk {state.chunk} of batch {state.batch_idx}")

    def after_step(self) -> None:
        """Inside the training step, after the user's step returned: the chunk's deferred local losses."""
        assert self.state is not None
        if self.split == "network" and self.state.seen_T is None:
            raise RuntimeError(
                f"{type(self.module).__name__}.training_step did not call the network {type(self.net).__name__} "
                "(or called it without reaching its first module): TruncatedLocalBPTT cuts the time axis where the "
                "network receives it. Call the network in training_step, or use time_split='batch'."
            )
        cuts.finish_chunk(self.state, self.loss_fn, self.silence.note)

    @contextmanager
    def _installed(self, state: BatchState) -> Iterator[None]:
        with (
            cuts.installed(
                self.net,
                self.probed.partition,
                self.classifiers,
                self.probed.runs,
                state,
                self.loss_fn,
                self.silence.note,
                cut_time=self.split == "network",
                output_spikes=self.output_spikes,
            ),
            packing.binary_saved_tensors(self.module, bits=self.pack_spikes),
            # a torch.compile'd network runs eagerly while it is cut: dynamo would trace the hooks and the kernel
            torch.compiler.set_stance("force_eager") if self.compiled else contextlib.nullcontext(),
        ):
            yield

    def _chunks(self, batch: Any, pristine: Any, state: BatchState) -> Iterator[Any]:
        versions = versions_of(batch)
        if self.split == "batch":
            chunks = self.split_batch(batch, self.k)
            if not chunks:
                raise ValueError("the batch is empty along its time axis: nothing to train on.")
            state.seen_T = len(chunks)
            yield from chunks
            return
        start = 0
        while True:
            state.window = (start, start + self.k)
            if start and versions_of(batch) != versions:
                if pristine is None:  # an edit the probe did not see (after the network call): copy from now on
                    self.edits_batch = True
                else:
                    batch = apply_to_collection(pristine, Tensor, lambda t: t.clone())
                    versions = versions_of(batch)
            yield batch
            assert state.seen_T is not None
            start += self.k
            if start >= state.seen_T:
                return

    def chunks_in(self, steps: int) -> int:
        return -(-steps // self.k)


def _copy_if_chunked(batch: Any, loop: ChunkLoop) -> Any:
    """A copy of the batch as the loader gave it, when the step edits it in place and more than one chunk will see it
    (memory the step's in-place edit costs, not every user)."""
    steps = loop.probed.T if loop.chunks_seen is None else None
    many = (loop.chunks_seen or 1) > 1 or (steps is not None and steps > loop.k)
    if loop.split == "network" and loop.edits_batch and many:
        return apply_to_collection(batch, Tensor, lambda t: t.clone())
    return None


def split_along_time(batch: Any, k: int, time_dim: int) -> list[Any]:
    """Cut every tensor of ``batch`` whose ``time_dim`` has the first tensor's length into chunks of ``k`` steps;
    the others (labels ``[B]``, one-hot targets) go whole to every chunk. Lightning 1.x's ``tbptt_split_batch``."""
    found = tensors(batch)
    first = found[0] if found else None
    if first is None or first.dim() <= time_dim:
        raise ValueError(
            f"time_split='batch' cuts the batch along time_dim={time_dim}, but its first tensor is "
            f"{'missing' if first is None else f'of shape {list(first.shape)}'}. Yield [B, T, ...] batches "
            "(time_dim=1), pass time_dim=, or define tbptt_split_batch(batch, split_size) on your LightningModule."
        )
    steps = first.shape[time_dim]
    return [
        apply_to_collection(
            batch,
            Tensor,
            lambda t, s=start, e=stop: (
                t.narrow(time_dim, s, e - s) if t.dim() > max(time_dim, 1) and t.shape[time_dim] == steps else t
            ),
        )
        for start, stop in time_chunks(steps, k)
    ]

"""Probing the user's network on the first training batch: where to cut it, and its local classifiers.

At the first training batch of a fit (not at setup: setup must draw no random number and start no DataLoader
iterator, so that a seeded run equals plain Lightning's), the user's own ``training_step`` runs on a copy of the batch
up to the network call, where a hook captures the network's input and stops the step. The network is then observed
on that input (:func:`~lightning_tlbptt.partitioning.observe`): its layers, blocks, entry and ``T``. Every random
stream (torch, CUDA, numpy, Python) is put back afterwards, and nothing the step logs is kept.

One :class:`~lightning_tlbptt.classifiers.LocalClassifier` is built per block but the last, sized on what the block
handed on in the probe.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from lightning_utilities.core.apply_func import apply_to_collection
from spikingjelly.activation_based import functional
from torch import Tensor, nn

from lightning_tlbptt import slicing
from lightning_tlbptt.batch import tensors
from lightning_tlbptt.classifiers import ClassifierKind, LocalClassifier
from lightning_tlbptt.partitioning import Partition, PartitionError, observe

__all__ = [
    "Probe",
    "build",
    "check_probe",
    "count_calls",
    "explain_cut_batch",
    "fingerprint",
    "forked_random_streams",
    "make_classifiers",
    "probe",
    "size_classifiers",
    "step_args",
    "time_axis_in_batch",
    "versions_of",
]


@dataclass(frozen=True)
class Probe:
    """What one probe of the network found.

    Attributes:
        partition: layers, blocks, entry, output width.
        T: time steps the network's entry received (``None`` for single-step networks).
        entry_shape: what the entry received, ``[T, B, ...]`` (``None`` for single-step networks).
        args, kwargs: the network's input in the probe (for measuring chunks with ``k='auto'``).
        block_inputs: what each block after the first received (one time step, detached).
        runs: the layers run in time slices (empty when slicing is off).
        fingerprint: the network's module tree, to notice a network rewrapped after the probe.
        edits_batch: the step edited its batch in place before it called the network (so every chunk after the
            first needs a copy of the batch as the loader gave it).
    """

    partition: Partition
    T: int | None
    entry_shape: tuple[int, ...] | None
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    block_inputs: list[Tensor]
    runs: list[slicing.Run]
    fingerprint: list[tuple[str, type]]
    edits_batch: bool


class _Captured(Exception):
    """Raised by a hook to stop the user's training step once the network's input is known."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.args, self.kwargs = args, kwargs


def _ignore(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``LightningModule.log`` while the probe runs: what the step logs there is not training."""


@contextlib.contextmanager
def forked_random_streams(device: torch.device) -> Iterator[None]:
    """Every random stream a user's step or dataset may draw from, put back as it was on exit."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)


def step_args(module: pl.LightningModule, batch: Any, batch_idx: int) -> tuple[Any, ...]:
    """The positional arguments Lightning passes to ``training_step``: ``batch_idx`` only if it takes one."""
    takes_idx = is_param_in_hook_signature(module.training_step, "batch_idx", min_args=2)
    return (batch, batch_idx) if takes_idx else (batch,)


def probe(
    module: pl.LightningModule,
    net: nn.Module,
    batch: Any,
    n: int | None,
    *,
    cut_time: bool,
    slice_bytes: int | None,
    coarsen: bool = True,
) -> Probe:
    """Run the user's training step on a copy of ``batch`` up to the network call and observe the network there."""
    batch = apply_to_collection(batch, Tensor, lambda t: t.clone())  # the step may edit its batch in place
    versions = versions_of(batch)

    def capture(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise _Captured(args, kwargs)

    handle = net.register_forward_pre_hook(capture, with_kwargs=True)
    module.log = module.log_dict = _ignore  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            module.training_step(*step_args(module, batch, 0))
    except _Captured as captured:
        args, kwargs = captured.args, captured.kwargs
    else:
        raise PartitionError(
            f"{type(module).__name__}.training_step did not call the network {type(net).__name__}: "
            "TruncatedLocalBPTT cuts the network as your training_step runs it. Call it there (directly or "
            "through forward), or pass network='<attribute>' naming the network it calls."
        )
    finally:
        handle.remove()
        del module.log, module.log_dict
    found = observe(net, n, args, kwargs, slice_time=cut_time)
    layers = [layer.modules for layer in found.partition.layers]
    runs = slicing.find_runs(net, layers, slice_bytes, coarsen=coarsen) if slice_bytes else []
    edits = versions_of(batch) != versions
    return Probe(
        found.partition, found.T, found.entry_shape, args, kwargs, found.block_inputs, runs, fingerprint(net), edits
    )


def versions_of(batch: Any) -> list[int]:
    """The version counters of a batch's tensors: they change when a tensor is edited in place."""
    return [t._version for t in tensors(batch)]


def count_calls(module: pl.LightningModule, net: nn.Module, batch: Any) -> int:
    """How often the user's whole training step calls ``net`` on a copy of ``batch`` (without gradient)."""
    batch = apply_to_collection(batch, Tensor, lambda t: t.clone())
    calls = 0

    def count(_: nn.Module, args: tuple[Any, ...]) -> None:
        nonlocal calls
        calls += 1

    handle = net.register_forward_pre_hook(count)
    module.log = module.log_dict = _ignore  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            module.training_step(*step_args(module, batch, 0))
    finally:
        handle.remove()
        del module.log, module.log_dict
        functional.reset_net(net)
    return calls


def make_classifiers(
    probed: Probe, *, kind: ClassifierKind, pool: int, seed: int, balance: bool = True
) -> nn.ModuleList:
    """One local classifier per block but the last, its linear layer not yet sized (:func:`size_classifiers`)."""
    part = probed.partition
    return nn.ModuleList(
        LocalClassifier(
            part.num_classes, part.neuron_template, kind=kind, pool=pool, seed=seed + block.index, balance=balance
        )
        for block in part.blocks[:-1]
    )


def size_classifiers(classifiers: nn.ModuleList, probed: Probe) -> None:
    """Run each classifier once, without gradient, on its block's probe output: sizes its lazy layer, names a
    misfit."""
    per_step = probed.partition.step_mode == "s"
    with torch.no_grad():
        for b, (classifier, h) in enumerate(zip(classifiers, probed.block_inputs, strict=True)):
            try:
                classifier(h.unsqueeze(0) if per_step else h)
            except RuntimeError as err:
                raise ValueError(
                    f"the local classifier of block {b} cannot read the block's output of shape {list(h.shape)} "
                    f"(one time step): {err}"
                ) from err
    functional.reset_net(classifiers)


def fingerprint(net: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(m)) for name, m in net.named_modules()]


def check_probe(probed: Probe, k: int | str) -> None:
    """``k`` fits the ``T`` the network receives; warn when its entry cannot tell time from samples."""
    shape = probed.entry_shape
    if shape is not None and len(shape) > 1 and shape[0] == shape[1]:
        rank_zero_warn(
            f"the network's first module receives {list(shape)}: as many time steps as samples, so "
            "TruncatedLocalBPTT cannot tell that its first axis is time. SpikingJelly expects [T, B, ...]; if "
            "your data is [B, T, ...], transpose it before it reaches the network (or the results are wrong)."
        )
    if probed.T is not None and isinstance(k, int) and k > probed.T:
        entry = probed.partition.entry
        raise ValueError(
            f"k={k} is larger than the number of time steps T={probed.T} the network receives (its first "
            f"module, {entry.name if entry else '?'}, gets [T, B, ...]); choose k <= {probed.T}."
        )


def time_axis_in_batch(
    module: pl.LightningModule, net: nn.Module, batch: Any, k: int | str, time_dim: int, device: torch.device
) -> bool:
    """A single-step network is cut in the batch: its step must call it once per step of the batch's time axis.

    A step that calls it a number of times unrelated to the batch loops over a static input: fine in one chunk
    (``k`` at least the number of calls: returns ``False``, cut nothing), refused with the change that makes it work
    otherwise."""
    if callable(getattr(module, "tbptt_split_batch", None)):
        return True  # the module cuts its own batches
    with forked_random_streams(device):
        calls = count_calls(module, net, batch)
    found = tensors(batch)
    steps = found[0].shape[time_dim] if found and found[0].dim() > time_dim else None
    if calls <= 1 or calls == steps:
        return True
    if isinstance(k, int) and k >= calls:
        return False
    shape = list(found[0].shape) if found else None
    raise MisconfigurationException(
        f"every neuron of {type(net).__name__} runs in step_mode='s' and your training_step calls it {calls} times "
        f"per batch, but the batch's time axis (time_dim={time_dim} of {shape}) has {steps} steps: the time loop "
        f"runs over a static input, so there is no time axis to cut at k={k}. Make the network multi-step and call "
        "it once on [T, B, ...]: functional.set_step_mode(net, 'm') and net(x.unsqueeze(0).repeat(T, *[1] * "
        "x.dim())) (then the strategy cuts T where the network receives it), yield batches with a time axis and "
        "pass time_dim=, or train with k >= the number of calls."
    )


def build(
    module: pl.LightningModule,
    net: nn.Module,
    batch: Any,
    split_batch: Callable[[Any, int], list[Any]] | None,
    *,
    k: int | str,
    n: int | None,
    time_dim: int,
    slice_bytes: int | None,
    coarsen: bool,
    kind: ClassifierKind,
    pool: int,
    seed: int,
    balance: bool,
    prepare: Callable[[nn.ModuleList], nn.ModuleList],
    device: torch.device,
) -> tuple[Probe, nn.ModuleList, Callable[[Any, int], list[Any]] | None]:
    """The first batch of a fit: probe the network (on the first chunk of ``batch`` when ``split_batch`` cuts
    batches) and build its local classifiers, ``prepare``d (device, precision) before they are sized.

    Returns the probe, the classifiers and the batch split to use (one chunk a batch for a time loop over a static
    input that ``k`` covers), every random stream as it was."""
    if split_batch is not None:
        if not time_axis_in_batch(module, net, batch, k, time_dim, device):
            split_batch = _whole
        chunks = split_batch(batch, k if isinstance(k, int) else 1)
        if not chunks:
            raise ValueError("the batch is empty along its time axis: nothing to train on.")
        batch = chunks[0]
    with forked_random_streams(device):
        try:
            probed = probe(
                module, net, batch, n, cut_time=split_batch is None, slice_bytes=slice_bytes, coarsen=coarsen
            )
        except Exception as err:
            if split_batch is not None and isinstance(k, int):
                explain_cut_batch(err, k, "the first chunk of the first batch, to find the network's cuts")
            raise
        classifiers = prepare(make_classifiers(probed, kind=kind, pool=pool, seed=seed, balance=balance))
        size_classifiers(classifiers, probed)
    return probed, classifiers, split_batch


def explain_cut_batch(err: Exception, k: int, where: str) -> None:
    """A user's own check on the number of time steps failed on a cut batch: say that it saw ``k`` steps."""
    if not getattr(err, "__notes__", None):
        err.add_note(
            f"TruncatedLocalBPTT ran your training_step on {where}: its batch was cut along time_dim to k={k} time "
            "steps (time_split='batch'). If your module checks the number of time steps against a configured T, "
            "compare with the input's own length instead, or train with k=T."
        )


def _whole(batch: Any, k: int) -> list[Any]:
    return [batch]

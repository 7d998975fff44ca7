"""Checks made while training: the local target, finite gradients, output neurons that fell silent.

- **Target.** The local classifiers need the batch's target (class indices ``[B]`` of any integer dtype, or
  per-class targets ``[B, C]``); :func:`local_target` finds it and checks it against the network's output width.
- **Finite gradients.** Before every optimizer step one fused norm over all gradients is read: a non-finite value
  raises before it reaches the weights, naming the parameter and its block.
- **Silence.** A spiking output neuron that never fires passes no surrogate gradient and can stay silent for good; a
  run that loses a whole class this way looks healthy by its loss. :class:`SilenceCheck` records which output
  neurons (of the network, if its output is spikes, and of each local classifier) fired in each chunk, read in the
  same host synchronisation as the gradient norm, and warns once per neuron set: after ``silent_steps`` optimizer
  steps in a row without a spike, or at the end of the first epoch whose second half (at least 20 steps) it spent
  silent, whichever comes first, so a collapse is reported within the epoch it happened in, not 200 steps later.
- **The optimizer's share.** Algorithm 1 steps the optimizer after every chunk, ``T / k`` times per batch; on a
  network with many parameters those steps can cost more than the rest of the batch (spiking_vgg11_bn under Adam,
  docs/benchmarks.md). :class:`StepCost` times the optimizer's own work (its step less the closure it calls) over the
  second batch of a fit (the first runs the probe) and, when it is more than a quarter of the batch, says so once,
  with its figure and the two levers: the optimizer's ``fused=True`` and ``step_every="batch"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

__all__ = ["SilenceCheck", "StepCost", "check_gradients", "describe", "finite_or_raise", "local_target"]

NETWORK_OUTPUT = "the network's output layer"

_EPOCH_FLOOR = 20
"""At an epoch's end, fewer silent steps than this are not reported (a short epoch says little)."""


def describe(value: Any) -> str:
    return f"a tensor of shape {list(value.shape)}" if isinstance(value, Tensor) else repr(value)[:80]


def local_target(
    batch: Any,
    batch_idx: int,
    num_classes: int,
    target: Callable[[Any], Tensor | None] | None,
    device: torch.device,
    label_free: bool = False,
) -> Tensor | None:
    """The local classifiers' target for this batch, checked against the network's output width.

    Class indices ``[B]`` of any integer dtype (as ``long``), or per-class targets ``[B, C]``; a one-output binary
    head takes 0/1 labels ``[B]`` or ``[B, 1]`` of any dtype (as float ``[B, 1]``). ``label_free``: the local loss is
    the user's own, so a ``target`` function may return ``None`` (a module without labels)."""
    if target is not None:
        found = target(batch)
        if found is None and label_free:
            return None
    elif isinstance(batch, (tuple, list)) and len(batch) > 1:
        found = batch[1]
    elif isinstance(batch, Mapping):
        found = next((batch[key] for key in ("target", "label", "labels", "y") if key in batch), None)
    else:
        found = None
    if not isinstance(found, Tensor):
        raise ValueError(
            f"the local classifiers need the batch's target but batch[1] (or batch['target'|'label'|'y']) is "
            f"{describe(found)}. Pass TruncatedLocalBPTT(target=lambda batch: <class indices [B]>); for a module "
            "without labels pass a local loss that needs none, TruncatedLocalBPTT(loss=lambda out_seq, target: "
            "<scalar from out_seq [k, B, C]>, target=lambda batch: None); or n=None (one block: no local "
            "classifier, only your own loss)."
        )
    if found.numel() == 0:
        raise ValueError(f"batch {batch_idx} is empty: its target has shape {list(found.shape)}.")
    if num_classes == 1:
        if found.dim() > 2 or found.shape[0] != found.numel() or not bool(((found == 0) | (found == 1)).all()):
            raise ValueError(
                f"the network has one output (a binary head), so the local classifiers read the target as 0/1 labels "
                f"[B] or [B, 1], but batch {batch_idx}'s has shape {list(found.shape)} and values other than 0 and "
                "1. Pass TruncatedLocalBPTT(target=lambda batch: <0/1 labels>)."
            )
        return found.reshape(-1, 1).float().to(device)
    if found.dim() == 1:
        if found.is_floating_point() or found.is_complex() or found.dtype == torch.bool:
            raise ValueError(
                f"batch {batch_idx}'s target is a {found.dtype} vector, but the local classifiers read a vector "
                f"as class indices in [0, {num_classes}). Pass TruncatedLocalBPTT(target=...) returning class "
                f"indices [B] or per-class targets [B, {num_classes}]."
            )
        low, high = (int(v) for v in torch.stack([found.min(), found.max()]).tolist())
        if low < 0 or high >= num_classes:
            bad = high if high >= num_classes else low
            raise ValueError(
                f"batch {batch_idx} has label {bad}, but the network has {num_classes} outputs, so labels must be "
                f"class indices in [0, {num_classes}). Check the dataset's labels, or the network's output width."
            )
        found = found.long()
    elif found.dim() != 2 or found.shape[1] != num_classes:
        raise ValueError(
            f"targets must be class indices [B] or per-class targets [B, {num_classes}], got shape "
            f"{list(found.shape)} in batch {batch_idx}. Pass target= to TruncatedLocalBPTT."
        )
    return found.to(device)


class SilenceCheck:
    """Which output neurons have not fired, for how many optimizer steps; warns once per neuron set.

    Args:
        silent_steps: optimizer steps without a spike before warning (``None``: the check is off).
        k: the chunk length, named in the advice; ``None`` when the optimizer steps once per batch.
        classifier: the kind of the strategy's local readouts (a frozen ``"random"`` one cannot move back).
    """

    def __init__(self, silent_steps: int | None, k: int | str | None, classifier: str = "trainable") -> None:
        self.silent_steps = silent_steps
        self.k = k
        self.classifier = classifier
        self._spiked: dict[str, Tensor] = {}
        self._silent: dict[str, list[int]] = {}
        self._warned: set[str] = set()
        self._never: dict[str, list[bool]] = {}  # per neuron: has not fired since training started
        self._epoch_steps = 0

    def note(self, who: str, spikes: Tensor) -> None:
        """Whether each output neuron (last axis) of ``spikes [..., C]`` fired in this chunk, kept on the device."""
        if self.silent_steps is not None:
            spiked = spikes.detach().ne(0).reshape(-1, spikes.shape[-1]).any(0)
            self._spiked[who] = spiked if who not in self._spiked else self._spiked[who] | spiked

    def take_flags(self) -> tuple[list[str], list[Tensor]]:
        """This chunk's flags, to be read in the step's one host synchronisation (:meth:`record`)."""
        keys, flags = list(self._spiked), [f.float() for f in self._spiked.values()]
        self._spiked.clear()
        return keys, flags

    def record(self, keys: list[str], fired: list[list[float]], global_step: int) -> None:
        """Count one optimizer step with these flags; warn after ``silent_steps`` silent steps."""
        for key, flags in zip(keys, fired, strict=True):
            counts = self._silent.get(key, [0] * len(flags))
            self._silent[key] = [0 if f else c + 1 for f, c in zip(flags, counts, strict=True)]
            never = self._never.get(key, [True] * len(flags))
            self._never[key] = [n and not f for n, f in zip(never, flags, strict=True)]
        self._epoch_steps += 1
        if self.silent_steps is not None:
            for key, counts in self._silent.items():
                silent = [i for i, c in enumerate(counts) if c >= self.silent_steps]
                self._warn(key, silent, global_step)

    def end_epoch(self, global_step: int) -> None:
        """At the end of an epoch: warn about output neurons silent for at least its second half."""
        if self.silent_steps is not None and self._epoch_steps:
            bound = min(self.silent_steps, max(_EPOCH_FLOOR, self._epoch_steps // 2))
            for key, counts in self._silent.items():
                self._warn(key, [i for i, c in enumerate(counts) if c >= bound], global_step)
        self._epoch_steps = 0

    def _warn(self, key: str, silent: list[int], global_step: int) -> None:
        if not silent or key in self._warned:
            return
        self._warned.add(key)
        counts = self._silent[key]
        who = key if len(silent) == len(counts) else f"output neuron(s) {silent} of {len(counts)} of {key}"
        steps = max(counts[i] for i in silent)
        never = all(self._never[key][i] for i in silent)
        if never and key == NETWORK_OUTPUT:
            why = (
                "It has not fired since training started: at initialization its inputs hold its membrane below the "
                "surrogate window, where no gradient passes, and a lower learning rate will not revive it. Start it "
                "inside the window: Trainer(callbacks=[lightning_tlbptt.OutputWindow()]) sets your output layer's "
                "bias so that its mean input holds the membrane at threshold and keeps it there (docs/strategy.md); "
                "or lower its threshold."
            )
        elif never:
            why = (
                "It has not fired since training started, although the strategy starts its local readouts inside "
                "the surrogate window: the block's output is probably silent too. Try "
                "TruncatedLocalBPTT(classifier='trainable') or a larger n (fewer, deeper blocks)."
            )
        elif key != NETWORK_OUTPUT and self.classifier == "random":
            why = (
                "It fired before, and the block's updates moved its input out of the surrogate window: a frozen "
                "random readout cannot move back. TruncatedLocalBPTT(classifier='trainable') lets it; a lower "
                "learning rate moves the block more slowly."
            )
        else:
            per_batch = "" if self.k is None else f", and every batch takes T/k optimizer steps (k={self.k})"
            window = (
                " Trainer(callbacks=[lightning_tlbptt.OutputWindow()]) moves an output that stayed silent for a "
                "whole batch back into its window."
                if key == NETWORK_OUTPUT
                else ""
            )
            why = (
                f"It fired before, so the updates pushed it out: the learning rate is usually too high{per_batch}; "
                f"lower it.{window}"
            )
        rank_zero_warn(
            f"{who} has not spiked for {steps} optimizer steps in a row (global step {global_step}), so it passes "
            f"no gradient back and its class may stay unlearnt. {why} (TruncatedLocalBPTT(silent_steps=None) turns "
            "this check off.)"
        )


def finite_or_raise(
    grads: list[Tensor], flags: list[Tensor], device: torch.device, on_failure: Callable[[], str]
) -> list[list[float]]:
    """One fused norm of ``grads`` and the silence flags, read in one host synchronisation.

    Raises ``FloatingPointError`` (with ``on_failure()``'s words) when the norm is not finite; returns the flags
    as floats."""
    norm = torch.stack(torch._foreach_norm(grads)).float().sum() if grads else torch.zeros((), device=device)
    values = torch.cat([norm.to(device).reshape(1), *[f.to(device) for f in flags]]).tolist()
    if not torch.isfinite(torch.tensor(values[0])):
        raise FloatingPointError(on_failure())
    out, offset = [], 1
    for f in flags:
        out.append(values[offset : offset + len(f)])
        offset += len(f)
    return out


def check_gradients(
    module: Any,
    optimizer: torch.optim.Optimizer,
    classifiers: nn.ModuleList | None,
    partition: Any,
    silence: SilenceCheck,
    device: torch.device,
    where: str,
) -> None:
    """Before the step: every gradient finite (else raise, naming the parameter, its block and ``where`` in the
    batch), and the silence check's flags counted, in one host synchronisation."""
    trainer = module.trainer
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    keys, flags = silence.take_flags()

    def failure() -> str:
        name, block = _first_non_finite(module, classifiers, partition)
        return (
            f"non-finite gradient of {name} ({block}) at {where} (global step {trainer.global_step}); the optimizer "
            "step was not taken, so the weights are still finite. "
            "Check the input for NaN/inf, lower the learning rate or enable gradient clipping "
            "(Trainer(gradient_clip_val=...))."
        )

    fired = finite_or_raise(grads, flags, device, failure)
    silence.record(keys, fired, trainer.global_step)


def _first_non_finite(module: nn.Module, classifiers: nn.ModuleList | None, partition: Any) -> tuple[str, str]:
    for name, p in module.named_parameters():
        if p.grad is not None and not p.grad.isfinite().all():
            for block in partition.blocks if partition is not None else ():
                if any(p is q for layer in block.layers for m in layer.modules for q in m.parameters()):
                    return name, f"block {block.index}"
            return name, "outside the blocks"
    for i, classifier in enumerate(classifiers or ()):
        for name, p in classifier.named_parameters():
            if p.grad is not None and not p.grad.isfinite().all():
                return f"local_classifiers.{i}.{name}", f"local classifier of block {i}"
    return "?", "?"


class StepCost:
    """The optimizer's own time over the second training batch of a fit, against the whole batch (module docstring).

    Args:
        share: the fraction of the batch above which it is reported.
    """

    def __init__(self, share: float = 0.25) -> None:
        self.share = share
        self.batches = 0
        self.steps = 0
        self.update_s = 0.0
        self._start: float | None = None

    @property
    def timing(self) -> bool:
        """Whether this batch is the one timed."""
        return self.batches == 1

    def start_batch(self) -> None:
        if self.timing:
            self._start = time.perf_counter()

    def step(self, run: Callable[[Callable[[], Any]], Any], closure: Callable[[], Any]) -> Any:
        """``run(closure)`` (the optimizer step), its time less the closure's added to the batch's update time."""
        inside = 0.0

        def timed() -> Any:
            nonlocal inside
            start = time.perf_counter()
            try:
                return closure()
            finally:
                inside += time.perf_counter() - start

        start = time.perf_counter()
        try:
            return run(timed)
        finally:
            self.update_s += time.perf_counter() - start - inside
            self.steps += 1

    def end_batch(self, optimizer: torch.optim.Optimizer, k: int | str, step_every: str) -> None:
        """After a batch: at the timed one, report the optimizer's share if it is above ``share``."""
        self.batches += 1
        if self._start is None:
            return
        batch_s, self._start = time.perf_counter() - self._start, None
        if self.steps == 0 or batch_s <= 0 or self.update_s / batch_s <= self.share:
            return
        levers = []
        if not optimizer.defaults.get("fused"):
            levers.append(
                f"{type(optimizer).__name__}(..., fused=True), torch's fused kernels (3.6-7.7x faster per Adam step "
                "on a CPU, docs/benchmarks.md), where your optimizer and device have them"
            )
        if step_every == "chunk":
            levers.append(
                "TruncatedLocalBPTT(step_every='batch'), one step per batch on the chunks' mean gradient (the same "
                "memory; not the paper's Algorithm 1, and T / k times fewer steps: give it the learning rate or "
                "epochs BPTT would get, docs/results.md)"
            )
        rank_zero_info(
            f"TruncatedLocalBPTT: the optimizer's {self.steps} step(s) took {self.update_s:.2f} s of the "
            f"{batch_s:.2f} s of batch 1 ({self.update_s / batch_s:.0%})"
            + (f", one after each chunk of k={k} steps (Algorithm 1)" if step_every == "chunk" else "")
            + (". Faster: " + "; or ".join(levers) + "." if levers else ".")
        )

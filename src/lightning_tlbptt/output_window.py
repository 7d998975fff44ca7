"""Keep a spiking network's output layer inside its surrogate window while the layers under it learn.

An output neuron learns only through its surrogate gradient, which is zero wherever its membrane stays outside a
window around the threshold (:mod:`lightning_tlbptt.classifiers`). An output layer can start outside it (PyTorch's
default init) or be pushed out later, when the layers below move its input under it for every sample: an output that
spikes on no sample passes no gradient back, cannot come back by itself, and its class is lost. The accuracy study
saw both, in BPTT as under truncation (``docs/results.md``: seeds 5-9 points low at the default init; one seed in six
of the truncated settings losing a digit later).

:class:`OutputWindow` applies to the network's output layer (an ``nn.Linear`` and the neuron it feeds) the rule the
strategy's local readouts follow, from :class:`~lightning_tlbptt.classifiers.SequenceMeasure`:

1. **start** (``balance=True``): its first training forward shifts the bias so that the mean input of that forward
   holds each output neuron's membrane at threshold (:func:`~lightning_tlbptt.classifiers.threshold_input`), so the
   outputs fire from the first step on; when the second batch starts, the bias is re-centred on the whole first
   batch's mean (every chunk of it, however the strategy cut it);
2. **keep**: from then on, an output that spiked on no sample and time step of a whole training batch has its bias
   moved back by the same rule, on that batch's mean, when the next batch starts. The outputs that fired are left
   alone.

Sums and counts are all-reduced over DDP ranks, so every rank sets the same bias. What the callback measured and
whether it has started are its state, in Lightning's checkpoints: a resumed fit moves what the uninterrupted one
would have. Only training forwards count (the module in training mode, gradients on): not validation, not the
strategy's probe of the network (which runs it in evaluation mode).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from spikingjelly.activation_based import neuron
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_tlbptt.classifiers import SequenceMeasure, _bias_width, _shift_bias, threshold_input

__all__ = ["OutputWindow", "output_layer"]


def output_layer(net: nn.Module, linear: nn.Linear | None = None) -> tuple[nn.Linear, neuron.BaseNode] | None:
    """The network's output FC and the neuron that spikes on it, or ``None`` when the output is not spikes.

    The output FC is ``linear``, by default the last ``nn.Linear`` in module order; its neuron is the first neuron
    after it, with no other weighted layer between (else the FC is not the output layer).
    """
    modules = list(net.modules())
    linears = [i for i, m in enumerate(modules) if isinstance(m, nn.Linear) and (linear is None or m is linear)]
    if not linears:
        return None
    last = linears[-1]
    for m in modules[last + 1 :]:
        if isinstance(m, neuron.BaseNode):
            return modules[last], m
        if isinstance(m, nn.modules.conv._ConvNd):
            return None
    return None


class OutputWindow(Callback):
    """Start a spiking output layer inside its surrogate window and keep it there (module docstring).

    >>> trainer = Trainer(callbacks=[OutputWindow()])  # doctest: +SKIP

    Args:
        layer: the dotted name of the output ``nn.Linear`` in your LightningModule (``"net.fc"``); by default the last
            ``nn.Linear`` of the module, which must feed a spiking neuron with no weighted layer between.
        balance: also start the layer at its threshold on its first training forward (step 1). ``False`` keeps
            your initialisation, for a layer balanced otherwise or a fit resumed from a trained network.
    """

    def __init__(self, layer: str | None = None, balance: bool = True) -> None:
        self.layer = layer
        self.started = not balance  # step 1 done (or not asked for)
        self._measure = SequenceMeasure()  # the batch running, or the last one until the next starts
        self._output: tuple[nn.Linear, nn.Module] | None = None
        self._handles: list[RemovableHandle] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(layer=self.layer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        linear, node = self._output = self._find(pl_module)
        _bias_width(linear)  # a layer without bias, or a neuron whose dynamics the rule does not know: named now
        threshold_input(node)
        self._remove()
        self._handles = [linear.register_forward_hook(self._current), node.register_forward_hook(self._spikes)]

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._output is not None and self._measure:
            self._measure.shift(*self._output, silent_only=self.started)
            self.started = True

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"started": self.started, "measure": self._measure.state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.started = bool(state_dict["started"])
        self._measure.load(state_dict.get("measure"))

    def _current(self, linear: nn.Module, _args: Any, current: Tensor) -> Tensor | None:
        if not (linear.training and torch.is_grad_enabled()):
            return None
        first = not self.started and not self._measure
        if first:  # fire from the first training forward on (re-centred on the whole batch when the next starts)
            flat = current.detach().reshape(-1, current.shape[-1])
            current = current + _shift_bias(linear, self._output[1], flat.sum(0), flat.shape[0])
        self._measure.add_current(current)
        return current if first else None

    def _spikes(self, node: nn.Module, _args: Any, spikes: Tensor) -> None:
        if node.training and torch.is_grad_enabled() and self._measure:
            self._measure.add_spikes(spikes)

    def _find(self, pl_module: pl.LightningModule) -> tuple[nn.Linear, nn.Module]:
        where = type(pl_module).__name__
        if self.layer is None:
            found = output_layer(pl_module)
            if found is None:
                raise ValueError(
                    f"OutputWindow found no spiking output layer in {where}: its last nn.Linear must feed a "
                    "spiking neuron with no conv or linear layer between. Name the layer: OutputWindow(layer='net.fc')."
                )
            return found
        try:
            linear = pl_module.get_submodule(self.layer)
        except AttributeError as err:
            raise ValueError(f"OutputWindow(layer={self.layer!r}): {where} has no such submodule ({err})") from err
        if not isinstance(linear, nn.Linear):
            raise ValueError(
                f"OutputWindow(layer={self.layer!r}) is a {type(linear).__name__}, not an nn.Linear: name the output "
                "nn.Linear that feeds the output neurons."
            )
        found = output_layer(pl_module, linear)
        if found is None:
            raise ValueError(
                f"OutputWindow(layer={self.layer!r}): no spiking neuron follows it in {where} before a conv layer; "
                "the window is for a layer whose outputs spike."
            )
        return found

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

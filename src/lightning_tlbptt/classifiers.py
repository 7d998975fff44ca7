"""Local classifiers: the readout that gives every block but the last its own loss, and the rule that starts a
spiking readout inside its surrogate window.

A spiking readout learns only through its neurons' surrogate gradient, which is zero wherever the membrane stays
outside a window around the threshold (the paper's rectangular surrogate, Eq. 6: ``|u - u_th| < a / 2``). At
PyTorch's default initialization the mean input of some output neurons keeps their membrane far below threshold for
every sample: they never fire and never learn, and their class is lost (``docs/results.md``, the first accuracy
study). The cure is data-dependent: shift each output neuron's bias so that its mean input over one batch is the
input that holds its membrane at threshold (:func:`threshold_input`, :func:`balance_bias`). The neurons then sit at
the edge of firing, inside the window for the samples around the mean, and their weights start learning.

:func:`threshold_input` is that input for a neuron's own dynamics. For a neuron with leak ``l`` per step towards its
rest ``v_rest`` (``v_reset``, or 0 with the soft reset) and input gain ``g``, ``v <- v - l (v - v_rest) + g x``, a
constant input settles the membrane at ``v_rest + g x / l``; the input whose steady membrane is the threshold is
``x* = l (u_th - v_rest) / g``, the smallest constant input that ever makes the neuron fire (its rheobase):

* ``LIFNode(tau, decay_input=False)`` (the paper's neuron, Eq. 1, ``tau = 1 / (1 - tau_p)``): ``l = 1 / tau``,
  ``g = 1``, so ``x* = (u_th - v_rest) / tau = u_th (1 - tau_p)``;
* ``LIFNode(tau, decay_input=True)``: ``l = g = 1 / tau``, so ``x* = u_th - v_rest``;
* ``ParametricLIFNode``: as ``LIFNode`` with ``1 / tau = sigmoid(w)``, read when balancing;
* ``IFNode``: no leak, ``l = 0``: any positive mean input eventually reaches the threshold and any negative one never
  does, so ``x* = 0``.

:class:`LocalClassifier` balances itself after its first training batch (``balance=True``); the paper's classifier
(:class:`~lightning_tlbptt.paper.classifier.PaperClassifier`) balances its network's output layer the same way.

Balancing once is not enough while the layers below keep learning: they can move an output's input below the window
for every sample, and an output that spikes on no sample passes no gradient and cannot come back by itself (a frozen
random readout cannot move at all). So both keep their outputs inside the window: :class:`SequenceMeasure` holds what
one training sequence (a batch, however it was cut) gave a readout, and an output that spiked on none of its rows has
its bias moved back by the same rule, on that sequence's mean, before the next one; the outputs that fired are left
alone.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from spikingjelly.activation_based import neuron
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

__all__ = [
    "ClassifierKind",
    "LocalClassifier",
    "SequenceMeasure",
    "balance_bias",
    "pooled_size",
    "readout_width",
    "threshold_input",
]

ClassifierKind = Literal["trainable", "random"]
"""``"trainable"`` local classifiers, or ``"random"`` ones (fixed random weights, Mostafa et al. 2018)."""

_ADAPTIVE_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def pooled_size(spatial: Sequence[int], pool: int | None) -> tuple[int, ...]:
    """Spatial size a local classifier reads from a feature map of size ``spatial``.

    ``pool`` per axis when any axis is larger than ``pool``, else the map as it is; ``pool=None`` never pools
    (the paper's classifier on the fully flattened block output).
    """
    if pool is not None and any(s > pool for s in spatial):
        return (pool,) * len(spatial)
    return tuple(spatial)


def readout_width(shape: Sequence[int], pool: int | None) -> int:
    """Input width of a local classifier reading a per-sample block output of ``shape``, ``(C, *spatial)`` or ``(F,)``.

    The rule :class:`LocalClassifier` pools by, so the cost model counts the classifier the strategy builds.
    """
    return math.prod(shape[:1]) * math.prod(pooled_size(shape[1:], pool))


def threshold_input(node: nn.Module) -> float:
    """The constant input that holds ``node``'s membrane at its threshold (its rheobase; see the module docstring).

    Raises:
        TypeError: ``node`` is not a ``LIFNode``, ``ParametricLIFNode`` or ``IFNode`` (or a subclass), whose
            dynamics this rule knows.
    """
    if isinstance(node, neuron.ParametricLIFNode):
        leak = float(torch.sigmoid(node.w.detach().float()))
    elif isinstance(node, neuron.LIFNode):
        leak = 1.0 / float(node.tau)
    elif isinstance(node, neuron.IFNode):
        return 0.0  # no leak: the edge between firing and silence is a zero mean input
    else:
        raise TypeError(
            f"cannot tell which input holds a {type(node).__name__}'s membrane at threshold: the rule knows LIFNode, "
            "ParametricLIFNode and IFNode (and their subclasses). Pass balance=False (the readout keeps PyTorch's "
            "initialization), or balance the bias yourself with balance_bias(linear, node, current) on a neuron it "
            "knows."
        )
    gain = leak if node.decay_input else 1.0
    rest = 0.0 if node.v_reset is None else float(node.v_reset)
    return leak * (float(node.v_threshold) - rest) / gain


@torch.no_grad()
def balance_bias(linear: nn.Linear, node: nn.Module, current: Tensor) -> Tensor:
    """Shift ``linear``'s bias so that the mean of ``current`` per output is ``threshold_input(node)``.

    ``current`` is what ``linear`` computed on one batch, the input of ``node`` (``[..., out_features]``); its mean
    over every other axis (samples and time steps) is averaged over the ranks when ``torch.distributed`` is
    initialised, so every rank sets the same bias. Whatever the bias was, the mean input afterwards is the threshold
    input: balancing again on another batch re-centres, it does not add up. Returns the shift, ``[out_features]``.

    Raises:
        ValueError: ``linear`` has no bias, or ``current``'s last axis is not its output width.
    """
    width = _bias_width(linear)
    if current.dim() == 0 or current.shape[-1] != width:
        raise ValueError(
            f"balance_bias got a current of shape {list(current.shape)} for a layer of {width} outputs: pass the "
            f"layer's own output, [..., {width}]."
        )
    flat = current.detach().reshape(-1, width).double()
    return _shift_bias(linear, node, flat.sum(0), flat.shape[0])


def _bias_width(linear: nn.Linear) -> int:
    if linear.bias is None:
        raise ValueError(
            f"{type(linear).__name__}(bias=False) has no bias to balance: build it with bias=True, or turn balancing "
            "off (balance=False)."
        )
    return linear.bias.shape[0]


@torch.no_grad()
def _shift_bias(linear: nn.Linear, node: nn.Module, sums: Tensor, rows: int, fired: Tensor | None = None) -> Tensor:
    """:func:`balance_bias` from the sums of ``linear``'s outputs over ``rows`` rows (the one place of the rule).

    With ``fired`` (per output, how many rows it spiked on), only the outputs that spiked on none move."""
    _bias_width(linear)
    parts = [sums.double().reshape(-1), torch.tensor([float(rows)], dtype=torch.float64, device=sums.device)]
    if fired is not None:
        parts.append(fired.double().reshape(-1).to(sums.device))
    totals = torch.cat(parts)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)  # sums and counts: ranks with different batch sizes weigh by their samples
    width = sums.numel()
    shift = threshold_input(node) - totals[:width] / totals[width].clamp_min(1)
    if fired is not None:
        shift = torch.where(totals[width + 1 :] == 0, shift, torch.zeros_like(shift))
    linear.bias.add_(shift.to(linear.bias))
    return shift.to(linear.bias)


class SequenceMeasure:
    """What one training sequence gave a readout ``linear -> node``, per output: the sum of its input current, the
    rows (samples x time steps), and the rows on which it spiked.

    Filled chunk by chunk (:meth:`add_current`, :meth:`add_spikes`), then :meth:`shift` moves the bias by
    :func:`balance_bias`'s rule and empties it. :meth:`state` / :meth:`load` carry it through a checkpoint written
    between two sequences (the owner's extra state). Under DDP each rank holds its own share, summed over the ranks
    when it is applied; a checkpoint holds rank 0's, so the first move after a resume is judged on rank 0's samples.
    """

    def __init__(self) -> None:
        self.sums: Tensor | None = None  # [width], float64
        self.rows = 0
        self.fired: Tensor | None = None  # [width]

    def __bool__(self) -> bool:
        return self.rows > 0

    def add_current(self, current: Tensor) -> None:
        """``current``: the linear layer's output, ``[..., width]``."""
        flat = current.detach().reshape(-1, current.shape[-1])
        total = flat.sum(0, dtype=torch.float64)
        self.sums = total if self.sums is None else self.sums.to(total.device) + total
        self.rows += flat.shape[0]

    def add_spikes(self, spikes: Tensor) -> None:
        """``spikes``: the neuron's output on that current, ``[..., width]``."""
        count = spikes.detach().reshape(-1, spikes.shape[-1]).ne(0).sum(0)
        self.fired = count if self.fired is None else self.fired.to(count.device) + count

    @torch.no_grad()
    def shift(self, linear: nn.Linear, node: nn.Module, silent_only: bool) -> Tensor:
        """Move ``linear``'s bias so the mean input is the threshold input: of every output, or (``silent_only``)
        of those that spiked on no row, counted over ranks. Returns the shift, ``[width]``; empties the measure."""
        fired = self.fired if silent_only else None
        if silent_only and fired is None:
            raise ValueError("SequenceMeasure.shift(silent_only=True) needs the spikes: call add_spikes too")
        shift = _shift_bias(linear, node, self.sums.to(linear.bias.device), self.rows, fired)
        self.load(None)
        return shift

    def state(self) -> dict[str, Any] | None:
        return None if not self else {"sums": self.sums, "rows": self.rows, "fired": self.fired}

    def load(self, state: Mapping[str, Any] | None) -> None:
        self.sums, self.rows, self.fired = (None, 0, None) if state is None else (
            state["sums"], int(state["rows"]), state["fired"]
        )  # fmt: skip


class LocalClassifier(nn.Module):
    """Flatten -> Linear -> spiking neuron, applied to a block's output over a chunk.

    Shapes: ``[k, B, C, *spatial]`` or ``[k, B, F]`` -> ``[k, B, num_classes]``.

    Feature maps larger than ``pool`` per spatial axis are first average-pooled to ``pool`` per axis, so
    the readout has at most ``C * pool ** d`` inputs whatever the resolution: a full flatten of a
    ``128 x 32 x 32`` map would make the classifier bigger than the layer it reads. The linear layer is
    lazy: its input width is known at the first batch, and it is then initialised from ``seed``
    (identically on every rank, reproducibly for ``kind="random"``). Random classifiers are frozen and
    still stored in checkpoints.

    With ``balance`` (the default), the readout starts at its threshold, in two steps (:func:`balance_bias`'s rule,
    averaged over ranks under ``torch.distributed``). Its first training forward (in training mode with gradients
    enabled; not a no-grad probe such as the strategy's setup call, nor evaluation) shifts the bias so that its mean
    output on the sequence's first time step holds the neuron's membrane at threshold, so the readout fires and
    learns from the first chunk on. The first step is the same however the batch is cut into chunks and time slices,
    so that start does not depend on ``k`` or ``slice_bytes``; but it is the ramp-up after a reset, whose mean is
    not the rest of the sequence's, and a readout left there sits off its threshold for the rest of it. So the
    whole first batch (every chunk and time slice until the neuron is reset) is measured too, and the first training
    forward after the reset (the next batch) re-centres the bias on that whole-sequence mean, as for the network's
    output layer (:class:`~lightning_tlbptt.paper.classifier.PaperClassifier`), again independent of the cut. A
    random readout gets the same start: its bias is set, then stays frozen. The buffer ``balanced`` records that both
    steps happened; it is in the ``state_dict`` (so in the strategy's checkpoints), and a classifier loaded from one is
    not balanced again. A state_dict saved before this buffer existed loads as balanced: that readout has trained
    already.

    Then the readout is kept inside the window (module docstring): an output that spiked on no sample and step of a
    whole training sequence (a batch, counted over ranks) has its bias moved back at the next sequence's start; one
    MNIST-5k seed had lost five of ten classes of block 0 to a frozen readout its block moved away from
    (docs/results.md). That :class:`SequenceMeasure` is the module's extra state, so a checkpoint written between the
    two sequences resumes into the same move.

    Args:
        num_classes: output width.
        template: a neuron of the network; the classifier's neuron is a fresh copy of it, so the
            readout spikes with the network's own dynamics (the paper's classifier neurons).
        kind: ``"trainable"`` or ``"random"`` (fixed random weights, Mostafa et al. 2018).
        pool: bound per spatial axis before flattening.
        seed: seed of the initial weights.
        balance: start the readout at its threshold on its first training chunk, re-centred after its first batch,
            and move an output that fell silent for a whole batch back (above). A neuron whose dynamics
            :func:`threshold_input` does not know turns it off, with a warning.
    """

    def __init__(
        self,
        num_classes: int,
        template: neuron.BaseNode,
        kind: ClassifierKind = "trainable",
        pool: int = 4,
        seed: int = 0,
        balance: bool = True,
    ) -> None:
        super().__init__()
        if kind not in ("trainable", "random"):
            raise ValueError(f"classifier must be 'trainable' or 'random', got {kind!r}")
        if not isinstance(pool, int) or pool < 1:
            raise ValueError(f"classifier_pool must be a positive int, got {pool!r}")
        self.kind = kind
        self.pool = pool
        self.seed = seed
        self.linear = nn.LazyLinear(num_classes)
        template.reset()  # a neuron holding a graph cannot be deep-copied
        self.neuron = copy.deepcopy(template)
        self.neuron.step_mode = "m"
        if kind == "random":
            self.linear.weight = UninitializedParameter(requires_grad=False)
            self.linear.bias = UninitializedParameter(requires_grad=False)
            self.neuron.requires_grad_(False)  # e.g. ParametricLIFNode's decay `w`: frozen means every parameter
        if balance:
            try:
                threshold_input(self.neuron)
            except TypeError as err:
                warnings.warn(f"LocalClassifier keeps its default initialization: {err}", stacklevel=2)
                balance = False
        self.balance = balance
        self.register_buffer("balanced", torch.tensor(False))
        self._measure = SequenceMeasure()  # of the sequence running, or the last one until the next starts

    def forward(self, x_seq: Tensor) -> Tensor:
        k, b = x_seq.shape[:2]
        x = x_seq.flatten(0, 1)
        spatial = tuple(x.shape[2:])
        size = pooled_size(spatial, self.pool)
        if size != spatial:
            if all(s % p == 0 for s, p in zip(spatial, size, strict=True)):
                # the same windows as adaptive pooling, whose CPU kernel takes twice as long
                x = _AVG_POOL[len(spatial)](x, [s // p for s, p in zip(spatial, size, strict=True)])
            else:
                x = _ADAPTIVE_POOL[len(spatial)](x, size)
        x = x.flatten(1)
        # a lazy layer loaded from a checkpoint holds its weights already and only turns into nn.Linear
        # at its first forward
        if isinstance(self.linear, LazyModuleMixin) and self.linear.has_uninitialized_params():
            # materialising draws from the global RNG; those numbers are replaced by the seeded ones, so
            # keep the user's RNG stream (dropout masks, shuffling) as if nothing happened
            with torch.no_grad(), torch.random.fork_rng(devices=[x.device.index] if x.is_cuda else []):
                self.linear(x)
            self._init_from_seed()
        measuring = self.balance and self.training and torch.is_grad_enabled()
        # a reset neuron holds its initial value, a float, until it runs: a new sequence (the strategy resets the
        # readouts at every batch) after the last one has been measured
        if measuring and self._measure and not isinstance(self.neuron.v, Tensor):
            balanced = self._is_balanced()  # then only the outputs that spiked on no row of the last sequence move
            self._measure.shift(self.linear, self.neuron, silent_only=balanced)
            if not balanced:
                self.balanced.fill_(True)
        current = self.linear(x)
        if measuring and not self._measure and not self._is_balanced():
            # its first training forward: fire from the first chunk on, from the first time step alone (the rows of
            # step 0 lead): the same however the chunk is sliced
            current = current + _shift_bias(self.linear, self.neuron, current[:b].detach().sum(0), b)
        out = self.neuron(current.unflatten(0, (k, b)))
        if measuring:
            self._measure.add_current(current)
            self._measure.add_spikes(out)
        return out

    def _is_balanced(self) -> bool:
        """``balanced``, read from the device only when the buffer changed since the last read.

        Reading a CUDA tensor's value waits for the device; this runs on every training chunk. Anything that writes
        the buffer (balancing, ``load_state_dict``, a restore with ``copy_``, DDP's buffer broadcast, ``.to()``)
        gives a new tensor or bumps its version counter, and only then is it read again.
        """
        flag = self.balanced
        seen = self.__dict__.get("_balanced_seen")
        if seen is None or seen[0] is not flag or seen[1] != flag._version:
            seen = (flag, flag._version, bool(flag))
            self.__dict__["_balanced_seen"] = seen
        return seen[2]

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # a readout saved before `balanced` existed has trained already: balancing it now would move a learnt bias
        state_dict.setdefault(prefix + "balanced", torch.tensor(True))
        state_dict.setdefault(prefix + "_extra_state", None)  # saved before the rescue: nothing measured
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def get_extra_state(self) -> dict[str, Any] | None:
        """The last training sequence's :class:`SequenceMeasure`, which the next one's start acts on."""
        return self._measure.state()

    def set_extra_state(self, state: dict[str, Any] | None) -> None:
        self._measure.load(state)

    @torch.no_grad()
    def _init_from_seed(self) -> None:
        """nn.Linear's default init (uniform, bound 1/sqrt(fan_in)), drawn from ``seed``."""
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        bound = 1.0 / math.sqrt(self.linear.in_features)
        for p in (self.linear.weight, self.linear.bias):
            p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=generator))

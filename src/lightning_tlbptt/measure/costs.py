"""The paper's analytic cost model: memory traffic, additions, MACs and memory of one batch iteration.

Guo et al. (2023), Section 4, model the cost of training one batch with temporally-truncated local
BPTT on a processor that holds one layer's weights and batch states on chip and keeps everything else
in external memory (DRAM):

* memory reads and writes (Eqs. 11-14): every time step reads and writes each layer's weights and
  batch neural states; at the last step of every truncation interval the top layer's and the
  classifier's states are still on chip and no gradient exists yet to accumulate, so that step
  reads less (Eq. 14);
* additions (Eqs. 15-16): synaptic accumulations of input spikes in the forward pass, error and
  weight-gradient accumulations in the backward pass;
* MACs (Eq. 17): only the backward propagation of real-valued errors multiplies; a block's first
  layer propagates nothing below it, which is why local blocks save most MACs;
* GPU memory (Eqs. 9-10): ``k`` steps of computational graph plus the parameters;
* the figure of merit (Eq. 18) combining accuracy loss with the four cost ratios.

:func:`profile` observes the network once (one time step, batch 1, zeros) with the strategy's own
partitioner (:func:`~lightning_tlbptt.partitioning.observe`) to learn every layer's size, so the model applies to
any network the strategy trains, without a Trainer or data; the network may live on the ``meta`` device. The rules
it shares with the strategy are the strategy's: layers and blocks (:func:`~lightning_tlbptt.partitioning.observe`,
:func:`~lightning_tlbptt.partitioning.block_groups`), chunks (:func:`~lightning_tlbptt.layout.time_chunks`), the
local classifier's input width (:func:`~lightning_tlbptt.classifiers.readout_width`). :func:`estimate` and
:meth:`NetworkProfile.estimate` evaluate the model for a ``(T, k, n, batch, classifier)`` configuration and return
a :class:`CostEstimate` with a per-layer breakdown; ``k=None`` and ``n=None`` are standard BPTT's whole sequence and
one block. Where the paper leaves a point open, the reading taken here is the one that reproduces the figures it
quotes; ``docs/costs.md`` lists each choice and the figures obtained. The ``tlbptt costs`` command is in
:mod:`tlbptt.cli`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from spikingjelly.activation_based import neuron
from torch import Tensor, nn

from lightning_tlbptt.classifiers import ClassifierKind, readout_width
from lightning_tlbptt.layout import time_chunks
from lightning_tlbptt.partitioning import PartitionError, block_groups, observe

__all__ = [
    "CostEstimate",
    "CostRatios",
    "CostRow",
    "LayerShape",
    "NetworkProfile",
    "estimate",
    "figure_of_merit",
    "profile",
]

Sparsity = float | Sequence[float]

BYTES_PER_ELEMENT = 4
"""Bytes of one stored number in the analytic memory estimate (float32, as the paper's PyTorch runs)."""


@dataclass(frozen=True)
class LayerShape:
    """What the cost model needs of one layer, per sample and per time step.

    Attributes:
        index: position among the network's layers (see :func:`~lightning_tlbptt.partitioning.observe`).
        name: the layer's first module name.
        weights: ``|W^n|``, weights of the layer's conv/linear modules (biases and norm parameters excluded,
            as in the paper).
        states: neuron states of the layer per sample: every SpikingJelly neuron of the layer (a pooling
            layer's LIF included); for an output layer without a neuron, its output size. ``|U^n|`` is this
            times the batch size.
        dense_macs: multiply-accumulates of the layer's conv/linear modules per sample without sparsity;
            ``M^n`` of Eq. 15 is this times the batch size.
        inputs: size of the layer's input per sample (the activations its weight gradient needs).
        out_shape: per-sample shape of the layer's output, ``(C, *spatial)`` or ``(F,)``: what a local
            classifier placed after this layer reads. Empty where no block can end (the last hidden layer,
            which always shares the output layer's block, and the output layer).
    """

    index: int
    name: str
    weights: int
    states: int
    dense_macs: int
    inputs: int
    out_shape: tuple[int, ...]


@dataclass(frozen=True)
class CostRow:
    """One layer's, classifier's or block's share of a :class:`CostEstimate` (counts for one batch).

    ``kind`` is ``"layer"`` (a hidden layer), ``"classifier"`` (a block's local classifier), ``"output"``
    (the network's output layer, which the paper treats as the last block's classifier) or ``"block"``
    (a block's total, from :meth:`CostEstimate.per_block`).
    """

    block: int
    name: str
    kind: Literal["layer", "classifier", "output", "block"]
    reads: float
    writes: float
    additions: float
    macs: float

    @property
    def memory_access(self) -> float:
        return self.reads + self.writes


@dataclass(frozen=True)
class CostRatios:
    """A configuration's costs divided by a reference's (standard BPTT, :meth:`NetworkProfile.bptt`): 1.0 is equal."""

    reads: float
    writes: float
    memory_access: float
    additions: float
    macs: float
    memory: float

    def memory_ratio(self, measured: float | None = None, reference: float | None = None) -> float:
        """The memory term of Eq. 18: a measured peak over standard BPTT's measured peak where both are known (the
        paper measures GPU memory), else the analytic ratio (Eqs. 9-10)."""
        return measured / reference if measured is not None and reference else self.memory

    def figure_of_merit(self, accuracy_loss: float, memory: float | None = None) -> float:
        """Eq. 18 with these ratios; ``memory`` overrides the analytic memory ratio (e.g. :meth:`memory_ratio`)."""
        return figure_of_merit(
            accuracy_loss, self.memory if memory is None else memory, self.memory_access, self.additions, self.macs
        )


@dataclass(frozen=True)
class CostEstimate:
    """Analytic costs of one batch iteration (all ``T`` steps, forward and backward, every block).

    Counts are numbers of elements moved (``reads``, ``writes``) or operations (``additions``, ``macs``),
    not bytes; ``memory`` is in bytes.

    Attributes:
        T, k, n, batch_size, classifier, classifier_pool: the configuration estimated; ``k`` and ``n`` are the
            time steps per chunk and hidden layers per block actually used (``T`` and ``n_hidden`` for BPTT).
        sparsity: input density ``alpha`` of every layer, in layer order (``alpha^{n-1}`` of Eq. 15).
        reads, writes: external-memory reads and writes (Eqs. 11-14).
        additions: additions (Eqs. 15-16).
        macs: multiply-accumulates (Eq. 17).
        memory: GPU memory in bytes (Eqs. 9-10): graph of the interval plus weights and gradients.
        rows: per-layer and per-classifier breakdown; the rows sum to the totals.
    """

    T: int
    k: int
    n: int
    batch_size: int
    classifier: ClassifierKind
    classifier_pool: int | None
    sparsity: tuple[float, ...]
    reads: float
    writes: float
    additions: float
    macs: float
    memory: float
    rows: tuple[CostRow, ...] = field(repr=False)

    @property
    def memory_access(self) -> float:
        """Reads plus writes: the paper's "number of memory access" (Figs. 9-10)."""
        return self.reads + self.writes

    @property
    def num_blocks(self) -> int:
        return max(row.block for row in self.rows) + 1

    def per_block(self) -> tuple[CostRow, ...]:
        """One row per block, classifier included: the per-block costs."""
        out = []
        for b in range(self.num_blocks):
            rows = [row for row in self.rows if row.block == b]
            out.append(
                CostRow(
                    block=b,
                    name=f"block{b}",
                    kind="block",
                    reads=sum(r.reads for r in rows),
                    writes=sum(r.writes for r in rows),
                    additions=sum(r.additions for r in rows),
                    macs=sum(r.macs for r in rows),
                )
            )
        return tuple(out)

    def relative_to(self, reference: CostEstimate) -> CostRatios:
        """This estimate's costs divided by ``reference``'s (e.g. standard BPTT of the same network)."""
        return CostRatios(**{f.name: getattr(self, f.name) / getattr(reference, f.name) for f in fields(CostRatios)})


def figure_of_merit(accuracy_loss: float, memory: float, memory_access: float, additions: float, macs: float) -> float:
    """The paper's figure of merit, Eq. 18: ``AL + 0.25 (MC + #MA + #ADD + #MAC)``; smaller is better.

    Every cost term is the ratio of the configuration's cost to standard BPTT's (1.0 = as costly as
    BPTT), and ``accuracy_loss`` is BPTT's accuracy minus the configuration's, as a fraction (0.01 is
    one percentage point; negative when the configuration is more accurate). BPTT itself scores 1.0.
    """
    return accuracy_loss + 0.25 * (memory + memory_access + additions + macs)


@dataclass(frozen=True)
class NetworkProfile:
    """Layer sizes of a network, learned once by :func:`profile`; evaluate configurations with it.

    Attributes:
        layers: every layer, the output layer last.
        num_classes: ``N_c``, the width of the output layer and of every local classifier.
        classifier_inputs: input width of a local classifier placed after hidden layer ``i``, for every
            hidden layer but the last (a block boundary never falls after it).
        classifier_pool: the local classifiers' pooling bound used for ``classifier_inputs``.
    """

    layers: tuple[LayerShape, ...]
    num_classes: int
    classifier_inputs: tuple[int, ...]
    classifier_pool: int | None

    @property
    def n_hidden(self) -> int:
        """Layers ``n`` counts: all but the output layer."""
        return len(self.layers) - 1

    def blocks(self, n: int | None) -> tuple[tuple[int, ...], ...]:
        """Layer indices of each block for ``n`` hidden layers per block (the strategy's rule, ``block_groups``)."""
        return tuple(tuple(g) for g in block_groups(len(self.layers), n))

    def estimate(
        self,
        *,
        T: int,
        k: int | None,
        n: int | None,
        batch_size: int,
        classifier: ClassifierKind = "trainable",
        sparsity: Sparsity = 1.0,
    ) -> CostEstimate:
        """Costs of one batch iteration of ``T`` steps in chunks of ``k`` with blocks of ``n`` hidden layers.

        Args:
            T: time steps of the batch.
            k: truncation interval; a last chunk of ``T mod k`` steps is counted as such; ``None``: the whole ``T``.
            n: hidden layers per block; ``None`` (or ``n >= n_hidden``) is one block (no local classifier).
            batch_size: ``N_b``.
            classifier: ``"random"`` local classifiers move no weights and accumulate no weight gradient.
            sparsity: input density ``alpha`` (fraction of non-zero inputs, in [0, 1]) of every layer, or one
                value per layer in layer order. A local classifier's ``alpha_c`` is the density of the block
                output it reads, i.e. the next layer's input density. The default 1.0 assumes no sparsity;
                it is the reading that reproduces the paper's addition figures (see docs/costs.md).
        """
        for name, value in (("T", T), ("k", k), ("n", n), ("batch_size", batch_size)):
            if value is None and name in ("k", "n"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if classifier not in ("trainable", "random"):
            raise ValueError(f"classifier must be 'trainable' or 'random', got {classifier!r}")
        alphas = self._sparsity(sparsity)
        chunks = [stop - start for start, stop in time_chunks(T, k)]
        blocks = self.blocks(n)
        rows: list[CostRow] = []
        for b, members in enumerate(blocks):
            hidden = [i for i in members if i != self.n_hidden]
            for pos, i in enumerate(hidden):
                rows.append(
                    self._layer_row(
                        b,
                        i,
                        first=pos == 0,
                        top=pos == len(hidden) - 1,
                        alphas=alphas,
                        chunks=chunks,
                        batch_size=batch_size,
                    )
                )
            if b == len(blocks) - 1:
                rows.append(self._classifier_row(b, None, alphas, chunks, batch_size, trainable=True))
            else:
                rows.append(self._classifier_row(b, hidden[-1], alphas, chunks, batch_size, classifier == "trainable"))
        return CostEstimate(
            T=T,
            k=chunks[0],
            n=sum(i != self.n_hidden for i in blocks[0]),
            batch_size=batch_size,
            classifier=classifier,
            classifier_pool=self.classifier_pool,
            sparsity=alphas,
            reads=sum(r.reads for r in rows),
            writes=sum(r.writes for r in rows),
            additions=sum(r.additions for r in rows),
            macs=sum(r.macs for r in rows),
            memory=self._memory(blocks, max(chunks), batch_size, classifier == "trainable"),
            rows=tuple(rows),
        )

    def bptt(self, *, T: int, batch_size: int, sparsity: Sparsity = 1.0) -> CostEstimate:
        """Standard BPTT of the same network: the whole sequence, one block."""
        return self.estimate(T=T, k=None, n=None, batch_size=batch_size, sparsity=sparsity)

    def _sparsity(self, sparsity: Sparsity) -> tuple[float, ...]:
        if isinstance(sparsity, (int, float)):
            alphas = (float(sparsity),) * len(self.layers)
        else:
            alphas = tuple(float(a) for a in sparsity)
            if len(alphas) != len(self.layers):
                raise ValueError(
                    f"sparsity has {len(alphas)} values but the network has {len(self.layers)} layers; give one "
                    "input density per layer, or one float for all"
                )
        if not all(0.0 <= a <= 1.0 for a in alphas):
            raise ValueError(f"sparsity values are input densities in [0, 1], got {alphas}")
        return alphas

    def _layer_row(
        self,
        block: int,
        i: int,
        *,
        first: bool,
        top: bool,
        alphas: tuple[float, ...],
        chunks: list[int],
        batch_size: int,
    ) -> CostRow:
        layer = self.layers[i]
        W, U, M, a = layer.weights, batch_size * layer.states, batch_size * layer.dense_macs, alphas[i]
        # Errors reach a layer's input only if a layer of the same block lies below it (Eqs. 12, 14, 17).
        W_up = 0 if first else W
        # Eq. 11 (forward), 12-13 (middle backward steps), 14 (last step of the interval: the top layer's
        # states are still on chip, no gradient to read yet, only gradients are written).
        step = _Step(reads=W + U, writes=U, additions=a * M)
        middle = _Step(
            reads=W + 2 * U + W_up, writes=W + U, additions=2 * U + batch_size * a * W, macs=0 if first else M
        )
        last = _Step(reads=W_up + (0 if top else U), writes=W, additions=U + batch_size * a * W, macs=0 if first else M)
        return _accumulate(block, layer.name, "layer", step, middle, last, chunks)

    def _classifier_row(
        self,
        block: int,
        after: int | None,
        alphas: tuple[float, ...],
        chunks: list[int],
        batch_size: int,
        trainable: bool,
    ) -> CostRow:
        if after is None:  # the output layer closes the last block and plays its classifier
            out = self.layers[-1]
            W, U, M, a = out.weights, batch_size * out.states, batch_size * out.dense_macs, alphas[-1]
            name, kind = out.name, "output"
        else:
            W = self.classifier_inputs[after] * self.num_classes
            U, M, a = batch_size * self.num_classes, batch_size * W, alphas[after + 1]
            name, kind = f"classifier{block}", "classifier"
        # Random classifier weights come from an on-chip generator: no traffic, no weight gradient.
        Wt = W if trainable else 0
        grad_adds = batch_size * a * W if trainable else 0
        step = _Step(reads=Wt + U, writes=U, additions=a * M)
        middle = _Step(reads=2 * Wt + 3 * U, writes=Wt + U, additions=2 * U + grad_adds, macs=M)
        last = _Step(reads=Wt, writes=Wt, additions=U + grad_adds, macs=M)
        return _accumulate(block, name, kind, step, middle, last, chunks)

    def _memory(self, blocks: tuple[tuple[int, ...], ...], k: int, batch_size: int, trainable: bool) -> float:
        """Eqs. 9-10: ``(k - 1) MC(CG) + MC_local(CG) + N(w)`` (+ gradients), in bytes.

        ``MC(CG)`` of one step is taken as each layer's input and neuron states (what autograd keeps to
        differentiate it) plus each local classifier's states and pooled input; ``MC_local(CG)`` as the
        largest block's share, since a block's graph can be freed after its backward at the interval's
        last step. :class:`~lightning_tlbptt.strategy.TruncatedLocalBPTT` frees every block's graph after
        its backward at every chunk, so it needs at most this.
        """
        graph = []
        weights = sum(layer.weights for layer in self.layers)
        classifier_weights = 0
        for b, members in enumerate(blocks):
            size = sum(self.layers[i].inputs + self.layers[i].states for i in members)
            if b < len(blocks) - 1:
                tap = self.layers[members[-1]]
                width = self.classifier_inputs[tap.index]
                # a classifier reading the block output as it is shares that tensor with the next layer;
                # only a pooled copy is new memory
                size += self.num_classes + (width if width != math.prod(tap.out_shape) else 0)
                classifier_weights += width * self.num_classes
            graph.append(batch_size * size)
        # every trainable weight has a gradient; random classifier weights are stored but get none
        stored = 2 * weights + (2 if trainable else 1) * classifier_weights
        return float(((k - 1) * sum(graph) + max(graph) + stored) * BYTES_PER_ELEMENT)


@dataclass(frozen=True)
class _Step:
    """Costs of one time step of one layer or classifier."""

    reads: float = 0.0
    writes: float = 0.0
    additions: float = 0.0
    macs: float = 0.0


def _accumulate(
    block: int,
    name: str,
    kind: Literal["layer", "classifier", "output"],
    forward: _Step,
    middle: _Step,
    last: _Step,
    chunks: list[int],
) -> CostRow:
    """Sum over the intervals: every step runs forward, the last one of each interval ``last``, the others
    ``middle`` backward."""
    steps = sum(chunks)
    middles = steps - len(chunks)
    total = {
        f.name: steps * getattr(forward, f.name)
        + middles * getattr(middle, f.name)
        + len(chunks) * getattr(last, f.name)
        for f in fields(_Step)
    }
    return CostRow(block=block, name=name, kind=kind, **total)


def profile(net: nn.Module, input_shape: Sequence[int], *, classifier_pool: int | None = 4) -> NetworkProfile:
    """Learn every layer's size from one observed forward of one zero time step of batch 1.

    The network is observed by the strategy's partitioner (:func:`~lightning_tlbptt.partitioning.observe`: eval
    mode, so batch norm statistics stay untouched, neurons reset afterwards), and nothing is allocated but one
    sample's activations: the network may be built on the ``meta`` device.

    Args:
        net: a SpikingJelly network, in ``step_mode='m'`` (fed ``[1, 1, *input_shape]``) or, when every neuron
            runs in ``step_mode='s'``, single-step (fed ``[1, *input_shape]``).
        input_shape: one sample at one time step, e.g. ``(C, H, W)``.
        classifier_pool: bound per spatial axis of the local classifiers (as
            :class:`~lightning_tlbptt.classifiers.LocalClassifier` pools, the strategy's
            ``classifier_pool``); ``None`` for the paper's classifier on the fully flattened block output.
    """
    if classifier_pool is not None and (not isinstance(classifier_pool, int) or classifier_pool < 1):
        raise ValueError(f"classifier_pool must be a positive int or None, got {classifier_pool!r}")
    single_step = all(m.step_mode == "s" for m in net.modules() if isinstance(m, neuron.BaseNode))
    parameter = next(net.parameters(), None)
    device = parameter.device if parameter is not None else None
    x = torch.zeros(1, *input_shape, device=device) if single_step else torch.zeros(1, 1, *input_shape, device=device)
    sizes: dict[int, tuple[int, int]] = {}  # id(module) -> (input numel, output numel), per sample and step

    def record(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        # batch 1 and one step: numel is the per-sample size whatever the layout ([1, 1, ...] or [1, ...])
        sizes[id(module)] = (args[0].numel(), output.numel())

    counted = (nn.modules.conv._ConvNd, nn.Linear, neuron.BaseNode)
    handles = [m.register_forward_hook(record) for m in net.modules() if isinstance(m, counted)]
    try:
        found = observe(net, 1, (x,), slice_time=not single_step)
    except PartitionError as err:
        raise ValueError(f"cannot profile {type(net).__name__} on one step of {list(input_shape)}: {err}") from err
    finally:
        for handle in handles:
            handle.remove()
    part = found.partition
    # n = 1: every hidden layer but the first starts a block, so every block input is a place a classifier reads
    taps = [tuple(h.shape[1:] if single_step else h.shape[2:]) for h in found.block_inputs]
    layers = []
    for layer in part.layers:
        weighted = layer.weighted
        calls = [sizes[id(m)] for m in weighted if id(m) in sizes]
        if len(calls) != len(weighted):
            raise ValueError(f"layer {layer.index} ({', '.join(layer.names)}) did not run in the probe forward")
        states = sum(sizes[id(m)][1] for m in layer.neurons if id(m) in sizes) or calls[-1][1]
        layers.append(
            LayerShape(
                index=layer.index,
                name=layer.names[0],
                weights=sum(m.weight.numel() for m in weighted),
                states=states,
                dense_macs=sum(_dense_macs(m, inp, out) for m, (inp, out) in zip(weighted, calls, strict=True)),
                inputs=calls[0][0],
                out_shape=taps[layer.index] if layer.index < len(taps) else (),
            )
        )
    return NetworkProfile(
        layers=tuple(layers),
        num_classes=part.num_classes,
        classifier_inputs=tuple(readout_width(shape, classifier_pool) for shape in taps),
        classifier_pool=classifier_pool,
    )


def estimate(
    net: nn.Module, *, input_shape: Sequence[int], classifier_pool: int | None = 4, **configuration: Any
) -> CostEstimate:
    """Reads, writes, additions, MACs and memory of one batch iteration of ``net`` (see :class:`CostEstimate`).

    ``input_shape`` is one sample at one step, e.g. ``(2, 128, 128)``, and ``classifier_pool`` the argument of
    :func:`profile`; ``configuration`` is the keyword arguments of :meth:`NetworkProfile.estimate` (``T``, ``k``,
    ``n``, ``batch_size``, ``classifier``, ``sparsity``). To evaluate many configurations, or to compare with
    standard BPTT (:meth:`NetworkProfile.bptt`, :meth:`CostEstimate.relative_to`), call :func:`profile` once.
    """
    return profile(net, input_shape, classifier_pool=classifier_pool).estimate(**configuration)


def _dense_macs(module: nn.Module, in_numel: int, out_numel: int) -> int:
    """MACs per sample: every output (input, for a transposed conv) takes ``weights / channels`` products."""
    per = module.weight.numel() // module.weight.shape[0]
    return (in_numel if isinstance(module, nn.modules.conv._ConvTransposeNd) else out_numel) * per

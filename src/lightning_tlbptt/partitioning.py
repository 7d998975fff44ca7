"""Cut a SpikingJelly network into gradient-isolated blocks of ``n`` layers, by watching one forward.

:func:`observe` runs the network once on what it receives in training while hooks record every module call
(SpikingJelly modules and checkpointed modules are kept whole), then reads from the autograd graph of the output
where the network can be cut without a gradient crossing: residual connections and branches are never cut, while
shape branches, Python loops, transposes and time-mean heads in ``forward`` simply run. A *layer* starts at a cut
before each weighted module (Conv/Linear) and keeps what follows it (BN, neuron, pooling, dropout, flatten) up to
the next layer. Following the paper (Sec. 3.4: "n = 4 corresponds to the standard BP" for the five-weighted-layer
LeNet), the last layer is the network's own output classifier: the hidden layers are grouped ``n`` at a time and
the output layer closes the last block (:func:`block_groups`); ``n=None`` is one block, standard BPTT.

The blocks run inside the network's own forward: the strategy hooks each block's first call, back-propagates the
block's local loss there and frees its graph before the block runs on. The cost model
(:func:`lightning_tlbptt.measure.costs.profile`) reads the same observation, so both see the same layers and blocks.

Compiled networks are partitioned through their original: a compiled graph hides the module calls and the autograd
graph the cuts are read from. :func:`find_network` and :func:`observe` take ``torch.compile(net)``'s original
(:func:`original`), and the probe runs with every compiled function of the network (``nn.Module.compile()`` in
place, compiled sub-modules) in eager mode, ``torch.compiler.set_stance("force_eager")``: it compiles nothing.
Nothing here builds or copies a user's module, so any ``nn.Module`` subclass can be partitioned.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from spikingjelly.activation_based import base, functional, neuron
from torch import Tensor, nn
from torch._dynamo import OptimizedModule  # torch.compile's wrapper; Lightning imports it from here too

__all__ = [
    "Block",
    "Cut",
    "Layer",
    "Observation",
    "Partition",
    "PartitionError",
    "block_groups",
    "find_network",
    "observe",
    "original",
]

_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


class PartitionError(ValueError):
    """The network cannot be cut into gradient-isolated blocks as asked."""


@dataclass(frozen=True)
class Layer:
    """One layer: a weighted unit and what follows it up to the next weighted unit.

    Attributes:
        index: position among all layers, from 0.
        names: qualified names of the modules (or glue ops) in execution order.
        modules: the opaque modules of the layer in execution order.
    """

    index: int
    names: tuple[str, ...]
    modules: tuple[nn.Module, ...]

    @property
    def weighted(self) -> tuple[nn.Module, ...]:
        """Conv/Linear modules of the layer (several for an indivisible residual unit)."""
        return tuple(m for unit in self.modules for m in unit.modules() if isinstance(m, _WEIGHTED))

    @property
    def neurons(self) -> tuple[neuron.BaseNode, ...]:
        return tuple(m for unit in self.modules for m in unit.modules() if isinstance(m, neuron.BaseNode))


@dataclass(frozen=True)
class Cut:
    """A place in the network's forward: the ``occurrence``-th call of ``module`` in one network call.

    A block starts at its cut: what the module receives there is the block's input, and everything the
    network computes from it belongs to this block or a later one.
    """

    module: nn.Module
    name: str
    occurrence: int = 0


@dataclass
class Block:
    """A gradient-isolated group of layers.

    The block runs inside the network's own forward, from its ``start`` cut (``None`` for the first block) to the
    next block's.
    """

    index: int
    layers: tuple[Layer, ...]
    is_last: bool
    start: Cut | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for layer in self.layers for name in layer.names)


@dataclass
class Partition:
    """Layers and blocks of a network, as :func:`observe` found them.

    Attributes:
        layers: every layer of the network; ``layers[-1]`` is the output layer.
        blocks: the gradient-isolated blocks, in order.
        step_mode: ``'m'`` (the network takes ``[T, B, ...]``) or ``'s'`` (one step ``[B, ...]`` per call).
        num_classes: width of the network's output (its last axis).
        neuron_template: a neuron of the network, which local classifiers copy.
        entry: the first module the network calls: where its input is time-major.
    """

    layers: list[Layer]
    blocks: list[Block]
    step_mode: Literal["s", "m"]
    num_classes: int
    neuron_template: neuron.BaseNode = field(repr=False)
    entry: Cut | None = None

    @property
    def n_hidden(self) -> int:
        """Number of layers the block size ``n`` counts: all but the output layer."""
        return len(self.layers) - 1


def original(module: nn.Module) -> nn.Module:
    """``module``, or the module ``torch.compile`` wrapped if it is a compiled one (an ``OptimizedModule``).

    The original shares its sub-modules and parameters with the compiled wrapper, and calling the wrapper calls
    it (compiled): hooks on the original and its sub-modules see every call of the wrapper.
    """
    while isinstance(module, OptimizedModule):
        module = module._orig_mod
    return module


def find_network(container: nn.Module, name: str | None = None, exclude: Collection[str] = ()) -> tuple[str, nn.Module]:
    """Find the spiking network inside a LightningModule (or any module).

    The network is the one direct child that holds SpikingJelly neurons (children named in ``exclude``
    aside), or the child called ``name``. A compiled network (``self.net = torch.compile(net)``) is returned as
    its :func:`original`, under the attribute name of the compiled one.
    """
    if name is not None:
        try:
            net = container.get_submodule(name)
        except AttributeError:
            children = ", ".join(n for n, _ in container.named_children()) or "none"
            raise PartitionError(
                f"{type(container).__name__} has no sub-module {name!r} (its children: {children}). "
                "Pass `network=` the attribute name of your SpikingJelly network."
            ) from None
        return name, original(net)
    spiking = [(n, m) for n, m in container.named_children() if n not in exclude and _has_neuron(m)]
    if len(spiking) == 1:
        return spiking[0][0], original(spiking[0][1])
    if not spiking:
        raise PartitionError(
            f"{type(container).__name__} holds no SpikingJelly neuron (a module deriving from "
            "spikingjelly.activation_based.neuron.BaseNode, e.g. neuron.LIFNode): TruncatedLocalBPTT trains "
            "spiking networks. Build your network from SpikingJelly neurons."
        )
    names = ", ".join(repr(n) for n, _ in spiking)
    raise PartitionError(
        f"{type(container).__name__} has several children holding spiking neurons ({names}); it is ambiguous "
        "which one is the network. Keep the whole network in one attribute (e.g. an nn.Sequential) or pass "
        "`TruncatedLocalBPTT(network='<attribute name>')`."
    )


def block_groups(n_layers: int, n: int | None) -> list[list[int]]:
    """Layer indices of each block: hidden layers ``n`` at a time, the output layer closing the last block.

    ``n=None`` (like any ``n >= n_layers - 1``) is one block: standard BPTT. This is the one rule that groups
    layers into blocks; the strategy and the cost model both use it.
    """
    hidden = n_layers - 1
    step = max(hidden, 1) if n is None else n
    groups = [list(range(i, min(i + step, hidden))) for i in range(0, hidden, step)] or [[]]
    groups[-1].append(hidden)
    return groups


def _has_neuron(module: nn.Module) -> bool:
    return any(isinstance(m, neuron.BaseNode) for m in module.modules())


# --- Partitions observed from one probe forward -----------------------------------------------------------------


@dataclass
class Observation:
    """What :func:`observe` learnt from one probe forward of the network.

    Attributes:
        partition: layers and blocks; every block after the first starts at a :class:`Cut`.
        entry_shape: shape of what the entry received, ``[T, B, ...]`` (``None`` unless ``slice_time``).
        block_inputs: what each block after the first received in the probe (one time step, detached),
            e.g. to build the readouts that read them.
    """

    partition: Partition
    entry_shape: tuple[int, ...] | None
    block_inputs: list[Tensor]

    @property
    def T(self) -> int | None:
        """Time steps the entry received."""
        return self.entry_shape[0] if self.entry_shape else None


@dataclass
class _Call:
    index: int
    module: nn.Module
    name: str
    occurrence: int
    unit: bool  # kept whole: a SpikingJelly module, a checkpointed module or a module without children
    input: Tensor | None = None  # its only tensor argument, if it takes exactly one
    output: Tensor | None = None
    end: int = -1  # how many calls had started when this one returned


def observe(
    net: nn.Module,
    n: int | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    slice_time: bool = True,
) -> Observation:
    """Cut ``net`` into blocks of ``n`` layers by watching one forward, whatever its ``forward`` does.

    The network runs once on ``args`` (what it receives in training) in eval mode with gradients on, while
    hooks record every module call in order (SpikingJelly modules and checkpointed modules are kept whole).
    A call is a possible cut when the tensor it receives is the only way from everything computed before
    to everything after: in the autograd graph of the output, that tensor is used by no op outside the
    call, and no parameter of an earlier call is reachable from the output without passing through it. So
    residual connections, branches and inline skip additions are never cut, while shape branches, Python
    loops, transposes and time-mean heads in ``forward`` simply run. A layer starts at the last possible cut
    before each weighted module (Conv/Linear); a weighted module with no cut before it (inside a residual
    block) joins the layer before. Blocks group the hidden layers ``n`` at a time, the output layer
    closing the last block (:func:`block_groups`).

    A compiled network is observed through its :func:`original`, with every compiled function run eagerly
    (``torch.compiler.set_stance("force_eager")``): the probe compiles nothing, and the cuts name the original's
    modules.

    Args:
        net: the spiking network (or ``torch.compile(net)``).
        n: hidden layers per block; ``None`` for one block (standard BPTT).
        args: positional inputs of one network call; ``kwargs`` its keyword inputs.
        slice_time: the first module the network calls (the *entry*) receives time-major data
            ``[T, B, ...]``: run the probe on its first time step of two samples only, which keeps it cheap.

    Raises:
        PartitionError: when the network has no neuron or weighted layer, its output depends on no
            parameter, or a parameter is shared by two blocks.
    """
    _check_n(n)
    net = original(net)
    neurons = _check_spiking(net)
    calls: list[_Call] = []
    stack: list[_Call] = []
    seen_calls: dict[int, int] = {}
    steps: list[tuple[int, ...]] = []

    def before(name: str, unit: bool, module: nn.Module, a: tuple[Any, ...], kw: dict[str, Any]) -> Any:
        call = _Call(len(calls), module, name, seen_calls.get(id(module), 0), unit)
        seen_calls[id(module)] = call.occurrence + 1
        if slice_time and not calls:
            x = a[0] if a else None
            if not isinstance(x, Tensor) or x.dim() < 2:
                raise PartitionError(
                    f"the first module {type(net).__name__} calls ({name}: {type(module).__name__}) receives "
                    f"{_describe(x)}, not time-major data [T, B, ...]. Run the network in step_mode='m' on "
                    "[T, B, ...], or cut the batch instead: TruncatedLocalBPTT(time_split='batch')."
                )
            steps.append(tuple(x.shape))
            a = (x[:1, :2], *a[1:])  # one step of two samples: the probe must not set the run's memory peak
        tensors = [v for v in (*a, *kw.values()) if isinstance(v, Tensor)]
        call.input = tensors[0] if len(tensors) == 1 else None
        calls.append(call)
        stack.append(call)
        return a, kw

    def after(module: nn.Module, a: tuple[Any, ...], kw: dict[str, Any], output: Any) -> None:
        call = stack.pop()
        call.output = _first_tensor(output)
        call.end = len(calls)

    handles = []
    for name, module, unit in _hookable(net):
        handles.append(module.register_forward_pre_hook(functools.partial(before, name, unit), with_kwargs=True))
        handles.append(module.register_forward_hook(after, with_kwargs=True))
    modes = {m: m.training for m in net.modules()}
    devices = sorted({p.device.index for p in net.parameters() if p.is_cuda})
    net.eval()
    try:
        # force_eager: compiled sub-modules (or net.compile() in place) would hide the calls the hooks record and
        # the autograd graph the cuts are read from; the probe runs once, so compiling for it would only cost time
        with torch.enable_grad(), torch.random.fork_rng(devices=devices), torch.compiler.set_stance("force_eager"):
            result = net(*args, **(kwargs or {}))
    except PartitionError:
        raise
    except Exception as err:
        received = f" Its first module received {list(steps[0])} (probed on the first step only)." if steps else ""
        raise PartitionError(
            f"the probe forward of {type(net).__name__} failed ({type(err).__name__}: {err}).{received} "
            "TruncatedLocalBPTT runs the network once on the first batch to find where to cut it. SpikingJelly's "
            "multi-step modules take [T, B, ...]: if the data has no time axis, repeat it over T steps before the "
            "network (e.g. SpikingClassifier(T=...)) or encode it."
        ) from err
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
        functional.reset_net(net)

    output = _first_tensor(result)
    if output is None or not calls:
        raise PartitionError(f"{type(net).__name__} returned {_describe(result)} and called no sub-module")
    if output.grad_fn is None:
        raise PartitionError(
            f"the output of {type(net).__name__} depends on no trainable parameter: nothing to train. Check "
            "that its parameters require grad."
        )
    layers, starts = _observed_layers(calls, output)
    groups = block_groups(len(layers), n)
    blocks = [
        Block(
            index=b,
            layers=tuple(layers[i] for i in group),
            is_last=b == len(groups) - 1,
            start=None if b == 0 else _cut(starts[group[0]]),
        )
        for b, group in enumerate(groups)
    ]
    _check_observed_isolated(blocks)
    step_modes = {m.step_mode for m in neurons}
    part = Partition(
        layers=layers,
        blocks=blocks,
        step_mode="m" if "m" in step_modes else "s",
        num_classes=output.shape[-1],
        neuron_template=neurons[0],
        entry=_cut(calls[0]),
    )
    inputs = [starts[group[0]].input.detach() for group in groups[1:]]  # type: ignore[union-attr]
    return Observation(partition=part, entry_shape=steps[0] if steps else None, block_inputs=inputs)


def _check_n(n: int | None) -> None:
    if n is None:
        return
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise PartitionError(f"n must be a positive int (layers per block) or None (one block), got {n!r}")


def _check_spiking(net: nn.Module) -> list[neuron.BaseNode]:
    neurons = [m for m in net.modules() if isinstance(m, neuron.BaseNode)]
    if not neurons:
        raise PartitionError(
            f"{type(net).__name__} contains no SpikingJelly neuron (spikingjelly.activation_based.neuron.BaseNode)"
            "; there is nothing to truncate in time. Add spiking neurons (e.g. neuron.LIFNode) to the network."
        )
    if not any(isinstance(m, _WEIGHTED) for m in net.modules()):
        raise PartitionError(
            f"{type(net).__name__} contains no weighted layer (nn.Conv*d or nn.Linear): nothing to train."
        )
    return neurons


def _hookable(net: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """``(name, module, is_unit)`` of every sub-module outside a unit; a unit's inside is never cut."""
    found: list[tuple[str, nn.Module, bool]] = []
    hidden: list[str] = []
    for name, module in net.named_modules():
        if not name or any(name.startswith(prefix) for prefix in hidden):
            continue
        whole = isinstance(module, base.StepModule) or hasattr(module, "_checkpoint_wrapped_module")
        if whole:
            hidden.append(name + ".")
        found.append((name, module, whole or next(module.children(), None) is None))
    return found


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _describe(value: Any) -> str:
    return f"a tensor of shape {list(value.shape)}" if isinstance(value, Tensor) else f"a {type(value).__name__}"


def _cut(call: _Call) -> Cut:
    return Cut(module=call.module, name=call.name, occurrence=call.occurrence)


def _consumers(root: Any) -> dict[tuple[Any, int], list[Any]]:
    """For every ``(node, output_nr)`` of the autograd graph under ``root``, the nodes that use it."""
    consumers: dict[tuple[Any, int], list[Any]] = {}
    seen, stack = {root}, [root]
    while stack:
        node = stack.pop()
        for nxt, nr in node.next_functions:
            if nxt is None:
                continue
            consumers.setdefault((nxt, nr), []).append(node)
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return consumers


def _reach(root: Any, stop: Any) -> set[Any]:
    """Nodes reachable from ``root`` without passing through ``stop``."""
    seen, stack = {root}, [root]
    while stack:
        for nxt, _ in stack.pop().next_functions:
            if nxt is not None and nxt is not stop and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _own_parameters(call: _Call) -> list[nn.Parameter]:
    return list(call.module.parameters(recurse=call.unit))


def _observed_layers(calls: list[_Call], output: Tensor) -> tuple[list[Layer], list[_Call]]:
    """The layers of an observed forward and the call each one starts at."""
    consumers = _consumers(output.grad_fn)
    taken: set[tuple[Any, int]] = set()

    def cuttable(call: _Call) -> bool:
        h, out = call.input, call.output
        if h is None or h.grad_fn is None or out is None or out.grad_fn is None:
            return False
        if out is h:  # an identity call (dropout in eval mode): the next call starts with the same tensor
            return False
        key = (h.grad_fn, h.output_nr)
        if key in taken:  # an enclosing call already starts with this tensor: cut there
            return False
        taken.add(key)
        if any(node_nr[0] is h.grad_fn and node_nr != key for node_nr in consumers):
            return False  # another output of the same op is used elsewhere (split, unbind)
        inside = _reach(out.grad_fn, stop=h.grad_fn)
        if any(user not in inside for user in consumers.get(key, ())):
            return False  # used again after the call: a skip connection starts here
        earlier = {id(p) for prior in calls[: call.index] if prior.end <= call.index for p in _own_parameters(prior)}
        reachable = _reach(output.grad_fn, stop=h.grad_fn)
        return not any(id(getattr(node, "variable", None)) in earlier for node in reachable)

    units = [c for c in calls if c.unit]
    first_unit, position = [0] * len(calls), len(units)
    unit_at = {c.index: i for i, c in enumerate(units)}
    for call in reversed(calls):
        position = unit_at.get(call.index, position)
        first_unit[call.index] = position
    cuts = [c for c in calls[1:] if cuttable(c)]
    weighted = [i for i, u in enumerate(units) if any(isinstance(m, _WEIGHTED) for m in u.module.modules())]
    if not weighted:
        raise PartitionError("no weighted layer (nn.Conv*d or nn.Linear) ran in the network's forward")
    starts, start_calls = [0], [calls[0]]
    for previous, current in itertools.pairwise(weighted):
        options = [c for c in cuts if previous < first_unit[c.index] <= current]
        if options:
            best = max(options, key=lambda c: (first_unit[c.index], -c.index))
            starts.append(first_unit[best.index])
            start_calls.append(best)
    layers = []
    for index, (lo, hi) in enumerate(itertools.pairwise([*starts, len(units)])):
        modules = tuple(dict.fromkeys(u.module for u in units[lo:hi]))
        layers.append(Layer(index=index, names=tuple(u.name for u in units[lo:hi]), modules=modules))
    return layers, start_calls


def _check_observed_isolated(blocks: list[Block]) -> None:
    owner: dict[int, int] = {}
    for block in blocks:
        for layer in block.layers:
            for p in (p for module in layer.modules for p in module.parameters()):
                seen = owner.setdefault(id(p), block.index)
                if seen != block.index:
                    raise PartitionError(
                        f"a parameter of layer {layer.index} ({', '.join(layer.names)}; block {block.index}) is "
                        f"also used in block {seen}: a gradient would cross the block boundary. Give each layer "
                        "its own parameters, or use a larger n so both fall in one block."
                    )

"""Cut a SpikingJelly network into gradient-isolated blocks of ``n`` layers.

The network is traced once with :mod:`torch.fx`, treating SpikingJelly modules (neurons, ``layer.*``)
as opaque, so the user's ``forward`` is recorded as it is, including functional glue such as
``torch.flatten(x, 2)`` or a ``[B, T] -> [T, B]`` transpose. Any sub-module whose traced graph is not a
chain (a residual block, a branch) is made opaque too, so a block boundary can never fall inside it.
What remains is a chain of units; a *layer* starts at every weighted unit (Conv/Linear, or an opaque
unit holding one) and keeps whatever follows it (BN, neuron, pooling, dropout, flatten) up to the next
weighted unit. Following the paper (Sec. 3.4: "n = 4 corresponds to the standard BP" for the
five-weighted-layer LeNet), the last weighted layer is the network's own output classifier: the
hidden layers are grouped ``n`` at a time and the output layer closes the last block.

Each block becomes an :class:`torch.fx.GraphModule` that shares the network's parameters, so the
strategy can run block ``i`` over a chunk, back-propagate its local loss and free its graph before
block ``i + 1`` runs.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx
from spikingjelly.activation_based import base, functional, neuron
from torch import Tensor, nn

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
    "partition",
]

_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)
# Ops that only move the time axis: a network that starts with one of them expects ``[B, T, ...]``
# and converts it itself (SpikingJelly's memopt example does ``input.transpose(0, 1).contiguous()``).
_LAYOUT_METHODS = {"transpose", "permute", "contiguous", "float"}


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

    For a partition from :func:`partition`, ``module`` maps the block's input to its output, both
    time-major (``[T, B, ...]``) in ``step_mode='m'``; in ``step_mode='s'`` it maps one step ``[B, ...]`` to
    one step. For one from :func:`observe`, ``module`` is ``None`` and the block runs inside the network's
    own forward, from its ``start`` cut (``None`` for the first block) to the next block's.
    """

    index: int
    layers: tuple[Layer, ...]
    module: fx.GraphModule | None
    is_last: bool
    start: Cut | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for layer in self.layers for name in layer.names)

    @property
    def out_features(self) -> int:
        """Channels (conv) or features (linear) of the block's last weighted or normalising module."""
        for unit in reversed([m for layer in self.layers for m in layer.modules]):
            for m in reversed(list(unit.modules())):
                for attr in ("out_channels", "out_features", "num_features"):
                    if isinstance(getattr(m, attr, None), int):
                        return getattr(m, attr)
        raise PartitionError(f"block {self.index} has no weighted layer")  # unreachable: layers start weighted


@dataclass
class Partition:
    """The result of :func:`partition`.

    Attributes:
        layers: every layer of the network; ``layers[-1]`` is the output layer.
        blocks: the gradient-isolated blocks, in order.
        step_mode: ``'m'`` (blocks take ``[T, B, ...]``) or ``'s'`` (blocks take ``[B, ...]``).
        input_layout: ``'TB'`` when the network expects time-major input, ``'BT'`` when its forward
            transposes ``[B, T, ...]`` itself (that transpose is not part of ``blocks[0]``).
        num_classes: output width of the output layer (:func:`observe`: of the network's output).
        entry: the first module the network calls (:func:`observe` only): where its input is time-major.
    """

    layers: list[Layer]
    blocks: list[Block]
    step_mode: Literal["s", "m"]
    input_layout: Literal["TB", "BT"]
    num_classes: int
    neuron_template: neuron.BaseNode = field(repr=False)
    entry: Cut | None = None

    @property
    def n_hidden(self) -> int:
        """Number of layers the block size ``n`` counts: all but the output layer."""
        return len(self.layers) - 1


class _Tracer(fx.Tracer):
    def __init__(self, opaque: Iterable[nn.Module] = ()) -> None:
        super().__init__()
        self.opaque = {id(m) for m in opaque}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            isinstance(m, base.StepModule) or id(m) in self.opaque or super().is_leaf_module(m, module_qualified_name)
        )


def find_network(container: nn.Module, name: str | None = None, exclude: Collection[str] = ()) -> tuple[str, nn.Module]:
    """Find the spiking network inside a LightningModule (or any module).

    The network is the one direct child that holds SpikingJelly neurons (children named in ``exclude``
    aside), or the child called ``name``.
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
        return name, net
    spiking = [(n, m) for n, m in container.named_children() if n not in exclude and _has_neuron(m)]
    if len(spiking) == 1:
        return spiking[0]
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


def partition(net: nn.Module, n: int) -> Partition:
    """Cut ``net`` into blocks of ``n`` hidden layers, the output layer closing the last block.

    Args:
        net: a SpikingJelly network whose forward calls its children in order (``nn.Sequential``, the
            model zoo's ResNets and VGGs, or a custom module).
        n: hidden layers per block; ``n >= len(layers) - 1`` gives one block (standard BPTT).

    Raises:
        PartitionError: when the network has no neuron or no weighted layer, cannot be traced, is not a
            chain at its top level, or shares a module or parameter between two blocks.
    """
    _check_n(n)
    neurons = _check_spiking(net)
    step_modes = {m.step_mode for m in neurons}
    if len(step_modes) > 1:
        raise PartitionError(
            f"{type(net).__name__} mixes neuron step modes {sorted(step_modes)}; call "
            "spikingjelly.activation_based.functional.set_step_mode(net, 'm') first."
        )

    chain, graph_root = _trace_chain(net)
    chain, input_layout = _strip_layout_prefix(chain)
    layers, layer_nodes = _group_layers(chain, graph_root)
    groups = block_groups(len(layers), n)
    blocks = []
    for b, group in enumerate(groups):
        nodes = [node for i in group for node in layer_nodes[i]]
        blocks.append(
            Block(
                index=b,
                layers=tuple(layers[i] for i in group),
                module=_subgraph_module(graph_root, nodes),
                is_last=b == len(groups) - 1,
            )
        )
    _check_isolated(blocks)
    out = layers[-1].weighted[-1]
    num_classes = out.out_features if isinstance(out, nn.Linear) else out.out_channels
    return Partition(
        layers=layers,
        blocks=blocks,
        step_mode=next(iter(step_modes)),
        input_layout=input_layout,
        num_classes=num_classes,
        neuron_template=neurons[0],
    )


def block_groups(n_layers: int, n: int) -> list[list[int]]:
    """Layer indices of each block: hidden layers ``n`` at a time, the output layer closing the last block."""
    hidden = n_layers - 1
    groups = [list(range(i, min(i + n, hidden))) for i in range(0, hidden, n)] or [[]]
    groups[-1].append(hidden)
    return groups


def _has_neuron(module: nn.Module) -> bool:
    return any(isinstance(m, neuron.BaseNode) for m in module.modules())


def _trace(net: nn.Module, opaque: Sequence[nn.Module]) -> fx.Graph:
    try:
        return _Tracer(opaque).trace(net)
    except Exception as err:  # fx raises many kinds of errors on untraceable Python
        raise PartitionError(
            f"could not trace {type(net).__name__}.forward into a sequence of layers ({type(err).__name__}: "
            f"{err}). TruncatedLocalBPTT runs the network block by block and needs a forward that calls its "
            "children in order without control flow on tensor values. Move data-dependent code (loops over "
            "time, shape checks) out of the network's forward, e.g. into your LightningModule."
        ) from err


def _node_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes]


def _stack(node: fx.Node) -> list[str]:
    """Qualified names of the modules the node was recorded in, outermost first, excluding itself."""
    names = list(node.meta.get("nn_module_stack", {}).keys())
    if node.op == "call_module" and names and names[-1] == node.target:
        names = names[:-1]
    return names


def _common_owner(nodes: Sequence[fx.Node]) -> str:
    """Innermost module that recorded all ``nodes``: the smallest unit that hides the break."""
    stacks = [_stack(node) for node in nodes if node.op != "output"]
    owner = ""
    for names in zip(*stacks, strict=False):
        if len(set(names)) != 1:
            break
        owner = names[0]
    return owner


def _trace_chain(net: nn.Module) -> tuple[list[fx.Node], nn.Module]:
    """Trace ``net``, making non-chain sub-modules opaque until the top-level graph is a chain."""
    opaque: list[nn.Module] = []
    while True:
        graph = _trace(net, opaque)
        nodes = [node for node in graph.nodes if node.op not in ("placeholder", "output")]
        placeholders = [node for node in graph.nodes if node.op == "placeholder"]
        if len(placeholders) != 1:
            raise PartitionError(
                f"{type(net).__name__}.forward takes {len(placeholders)} inputs; TruncatedLocalBPTT feeds the "
                "network one tensor [T, B, ...] (or [B, T, ...])."
            )
        offender = _first_break(placeholders[0], nodes)
        if offender is None:
            return nodes, net
        owner = _common_owner(offender)
        if not owner:
            raise PartitionError(
                f"the forward of {type(net).__name__} is not a chain of layers at its top level: "
                f"{offender[0].format_node()} takes or feeds several tensors. TruncatedLocalBPTT cannot place "
                "block boundaries in it. Wrap the branching part (e.g. a residual connection) in its own "
                "nn.Module so that it is treated as one indivisible layer."
            )
        module = net.get_submodule(owner)
        if any(m is module for m in opaque):  # cannot happen: an opaque module hides its inside
            raise PartitionError(f"internal error: {owner} is already opaque")
        opaque.append(module)


def _first_break(start: fx.Node, nodes: list[fx.Node]) -> list[fx.Node] | None:
    """The first place where data stops flowing as one tensor from node to node.

    Returns the nodes that make up the break: the users of a tensor used twice (a skip connection
    starts there), or a node that takes another input (a parameter read by a functional op).
    """
    previous = start
    for node in nodes:
        if len(previous.users) != 1:
            return list(previous.users)
        if node.op == "get_attr" or _node_inputs(node) != [previous]:
            return [node]
        previous = node
    return None


def _strip_layout_prefix(chain: list[fx.Node]) -> tuple[list[fx.Node], Literal["TB", "BT"]]:
    """Drop leading layout-only ops; report whether they swapped the time and batch axes."""
    swapped = False
    i = 0
    while i < len(chain) and chain[i].op == "call_method" and chain[i].target in _LAYOUT_METHODS:
        node = chain[i]
        if node.target == "transpose":
            dims = {_int(a) for a in node.args[1:3]}
            if dims != {0, 1}:
                break
            swapped = not swapped
        elif node.target == "permute":
            perm = [_int(a) for a in (node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:])]
            if perm[:2] != [1, 0] or perm[2:] != list(range(2, len(perm))):
                break
            swapped = not swapped
        i += 1
    return chain[i:], ("BT" if swapped else "TB")


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int) else -1


def _group_layers(chain: list[fx.Node], root: nn.Module) -> tuple[list[Layer], list[list[fx.Node]]]:
    def weighted(node: fx.Node) -> bool:
        if node.op != "call_module":
            return False
        return any(isinstance(m, _WEIGHTED) for m in root.get_submodule(node.target).modules())

    starts = [i for i, node in enumerate(chain) if weighted(node)]
    # glue before the first weighted unit (e.g. an encoder transform) belongs to the first layer
    bounds = [0, *starts[1:], len(chain)]
    layers, layer_nodes = [], []
    for index, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        nodes = chain[lo:hi]
        layers.append(
            Layer(
                index=index,
                names=tuple(_node_name(node) for node in nodes),
                modules=tuple(root.get_submodule(node.target) for node in nodes if node.op == "call_module"),
            )
        )
        layer_nodes.append(nodes)
    return layers, layer_nodes


def _node_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    target = node.target
    return getattr(target, "__name__", str(target)) if node.op == "call_function" else f".{target}()"


def _subgraph_module(root: nn.Module, nodes: list[fx.Node]) -> fx.GraphModule:
    graph = fx.Graph()
    x = graph.placeholder("x")
    env: dict[fx.Node, fx.Node] = {}
    first_input = _node_inputs(nodes[0])[0]
    env[first_input] = x
    for node in nodes:
        env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(env[nodes[-1]])
    return fx.GraphModule(root, graph, class_name="TLBPTTBlock")


def _check_isolated(blocks: list[Block]) -> None:
    """Refuse a partition where a module or parameter is used by two blocks: its gradient would mix."""
    owner: dict[int, tuple[int, str]] = {}
    for block in blocks:
        for name, module in block.module.named_modules():
            for p in module.parameters(recurse=False):
                seen = owner.setdefault(id(p), (block.index, name))
                if seen[0] != block.index:
                    raise PartitionError(
                        f"parameter of {name!r} (block {block.index}) is also used by {seen[1]!r} (block "
                        f"{seen[0]}): a gradient would cross the block boundary. Give each layer its own "
                        "parameters, or use a larger n so both fall in one block."
                    )


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
    n: int,
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

    Args:
        net: the spiking network.
        n: hidden layers per block.
        args: positional inputs of one network call; ``kwargs`` its keyword inputs.
        slice_time: the first module the network calls (the *entry*) receives time-major data
            ``[T, B, ...]``: run the probe on its first time step of two samples only, which keeps it cheap.

    Raises:
        PartitionError: when the network has no neuron or weighted layer, its output depends on no
            parameter, or a parameter is shared by two blocks.
    """
    _check_n(n)
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
        with torch.enable_grad(), torch.random.fork_rng(devices=devices):
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
            module=None,
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
        input_layout="TB",
        num_classes=output.shape[-1],
        neuron_template=neurons[0],
        entry=_cut(calls[0]),
    )
    inputs = [starts[group[0]].input.detach() for group in groups[1:]]  # type: ignore[union-attr]
    return Observation(partition=part, entry_shape=steps[0] if steps else None, block_inputs=inputs)


def _check_n(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise PartitionError(f"n must be a positive int (layers per block), got {n!r}")


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

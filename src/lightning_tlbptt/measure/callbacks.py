"""Lightning callbacks that measure and model training cost, for any logger.

* :class:`MemoryMonitor`: measured peak memory of a training step (saved activations, parameters,
  gradients, optimizer state; CUDA's ``max_memory_allocated`` on GPU).
* :class:`SpikeDensityMonitor`: measured input density of every layer and local classifier (the
  paper's ``alpha``).
* :class:`CostMonitor`: the paper's analytic costs (:mod:`lightning_tlbptt.measure.costs`) of the running
  configuration and of standard BPTT, their ratios, the figure of merit, and the training
  hyperparameters ``k, n, T, classifier, loss``.
* :class:`OpCounterMonitor`: SpikingJelly's ``op_counter`` counts of one chunk's forward and backward.

They work with :class:`~lightning_tlbptt.strategy.TruncatedLocalBPTT`, whose public attributes they read
(``partition``, ``spiking_network``, ``local_classifiers``, ``k``, ``n``, ``classifier``, ``classifier_pool``,
``loss_fn``), and with plain BPTT (any other strategy: the whole sequence, one block, observed at the first
training batch by the strategy's own partitioner). Each samples one training batch every ``every_n_steps`` batches (the
``every_n_steps``-th, ``2 * every_n_steps``-th, ...) and leaves the others untouched, which bounds its
overhead. Values go straight to every logger of the Trainer at the current ``global_step``, so a sample
is never dropped by ``Trainer(log_every_n_steps=...)``; they are also kept on the callback
(``.metrics``). Every key, its unit and its place in the paper are listed in ``docs/costs.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from spikingjelly.activation_based import neuron, op_counter
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.utils.hooks import RemovableHandle

from lightning_tlbptt.layout import to_time_major
from lightning_tlbptt.losses import loss_name
from lightning_tlbptt.measure.costs import CostEstimate, CostRatios, NetworkProfile, profile
from lightning_tlbptt.memory import SavedTensorsMeter, training_state
from lightning_tlbptt.partitioning import Partition, find_network, observe
from lightning_tlbptt.strategy import TruncatedLocalBPTT

__all__ = ["CostMonitor", "MemoryMonitor", "OpCounterMonitor", "SpikeDensityMonitor"]


class _Sampling(Callback):
    """Decides which training batches a monitor measures: one in ``every_n_steps``."""

    def __init__(self, every_n_steps: int) -> None:
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.metrics: dict[str, float] = {}
        self._batches = 0

    def _due(self) -> bool:
        return (self._batches + 1) % self.every_n_steps == 0

    def _advance(self) -> None:
        self._batches += 1

    def _release(self) -> None:
        """Undo what a sampled batch installed (hooks, modes); its end may never come."""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a module's on_train_batch_start returning -1 ends the epoch without on_train_batch_end
        self._release()


def _log(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=trainer.global_step)


@dataclass
class _Setup:
    """How the module is trained: the network, its layers and the truncation settings."""

    net: nn.Module
    partition: Partition
    k: int | None  # None: the whole sequence (BPTT)
    n: int | None  # None: one block (BPTT)
    classifier: str  # "trainable", "random", or "none" for BPTT
    classifier_pool: int | None  # None for BPTT, which has no local classifier
    loss: str
    classifiers: nn.ModuleList | None


def _inputs(module: pl.LightningModule, batch: Any) -> Tensor:
    """The batch's network input as ``[T, B, ...]``, read the way the module reads it."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return to_time_major(x, getattr(module, "batch_layout", None) or "BT", getattr(module, "T", None))


def _setup(trainer: pl.Trainer, module: pl.LightningModule, batch: Any) -> _Setup:
    strategy = trainer.strategy
    if isinstance(strategy, TruncatedLocalBPTT) and trainer.training:
        strategy.prepare(batch)  # the strategy probes at the first batch's optimisation, after this hook
    if isinstance(strategy, TruncatedLocalBPTT) and strategy.partition is not None:
        assert strategy.spiking_network is not None
        return _Setup(
            net=strategy.spiking_network,
            partition=strategy.partition,
            k=strategy.k if isinstance(strategy.k, int) else None,
            n=strategy.n,
            classifier=strategy.classifier,
            classifier_pool=strategy.classifier_pool,
            loss=loss_name(strategy.loss_fn),
            classifiers=strategy.local_classifiers,
        )
    # plain BPTT: one block, observed on the batch's first step the way the strategy observes its network
    _, net = find_network(module)
    x = _inputs(module, batch)
    single_step = all(m.step_mode == "s" for m in net.modules() if isinstance(m, neuron.BaseNode))
    found = observe(net, None, (x[0],) if single_step else (x,), slice_time=not single_step)
    return _Setup(
        net=net,
        partition=found.partition,
        k=None,
        n=None,
        classifier="none",
        classifier_pool=None,
        loss=loss_name(getattr(module, "loss_fn", None)),
        classifiers=None,
    )


class MemoryMonitor(_Sampling):
    """Measured peak memory of a training step, in bytes.

    On every device, the peak of activations saved for backward during the step (the paper's
    ``MC(CG)``, what truncation and local blocks shrink), measured with
    :class:`~lightning_tlbptt.memory.SavedTensorsMeter`, plus the parameter, gradient and optimizer-state
    bytes that exist whatever ``k`` and ``n`` (``N(w)`` and ``N(grads)`` of Eq. 8); their sum is the
    step's modelled peak, the CPU counterpart of the paper's GPU memory. On CUDA it also logs
    ``torch.cuda.max_memory_allocated`` over the step (the paper's measurement, Sec. 4.1), its peak
    statistics reset when the step starts.

    Logged keys: ``cost/memory/saved_activations_bytes``, ``cost/memory/params_bytes``,
    ``cost/memory/grads_bytes``, ``cost/memory/optimizer_state_bytes``, ``cost/memory/total_bytes`` and, on
    CUDA, ``cost/memory/cuda_max_allocated_bytes``.

    Args:
        every_n_steps: measure one training batch in this many. The meter runs a Python hook per saved
            tensor, so measured steps are slower; memory does not change from step to step.
    """

    def __init__(self, every_n_steps: int = 10) -> None:
        super().__init__(every_n_steps)
        self._meter: SavedTensorsMeter | None = None

    @property
    def peak_bytes(self) -> float | None:
        """The latest measured peak: CUDA's when on GPU, else ``total_bytes``; ``None`` before a sample."""
        return self.metrics.get("cost/memory/cuda_max_allocated_bytes", self.metrics.get("cost/memory/total_bytes"))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._due():
            return
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._meter = SavedTensorsMeter().__enter__()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._advance()
        if self._meter is None:
            return
        saved = self._meter.peak_bytes
        self._release()
        params = [p for p in pl_module.parameters() if not is_lazy(p)]
        # the parameters once, each optimizer's state: the rule the strategy's memory budget uses too
        states = [training_state(params if i == 0 else [], opt) for i, opt in enumerate(trainer.optimizers)]
        metrics = {
            "cost/memory/saved_activations_bytes": float(saved),
            "cost/memory/params_bytes": float(sum(s.params for s in states)),
            # gradients are freed after each optimizer step; count what they take while they exist
            "cost/memory/grads_bytes": float(sum(s.grads for s in states)),
            "cost/memory/optimizer_state_bytes": float(sum(s.optimizer_state for s in states)),
        }
        metrics["cost/memory/total_bytes"] = sum(metrics.values())
        if pl_module.device.type == "cuda":
            metrics["cost/memory/cuda_max_allocated_bytes"] = float(torch.cuda.max_memory_allocated(pl_module.device))
        self.metrics = metrics
        _log(trainer, metrics)

    def _release(self) -> None:
        if self._meter is not None:
            self._meter.__exit__(None, None, None)
            self._meter = None


class SpikeDensityMonitor(_Sampling):
    """Measured density of the input of every layer and local classifier: the paper's ``alpha``.

    The density is the fraction of non-zero entries, over all time steps, samples and chunks of the
    batch: for spikes, the firing rate of the layer below; for the first layer, of the input data
    (event frames, or the pixels of a static image under direct encoding). A layer's input is what
    enters its first conv/linear module; a classifier's is the block output it reads. Only
    gradient-enabled (training) forwards count, so probes under ``no_grad`` leave no trace. The hooks
    exist only during sampled batches.

    Logged keys: ``density/layer{i}`` for every layer ``i`` (0 = first, the last is the output layer)
    and ``density/classifier{i}`` for the local classifier of block ``i``. :class:`CostMonitor` uses
    :attr:`layer_densities` as the sparsity of its analytic additions.

    Args:
        every_n_steps: measure one training batch in this many.
    """

    def __init__(self, every_n_steps: int = 10) -> None:
        super().__init__(every_n_steps)
        self.layer_densities: tuple[float, ...] | None = None
        self._num_layers = 0
        self._targets: list[tuple[str, nn.Module]] | None = None
        self._counts: dict[str, list[Any]] = {}
        self._handles: list[RemovableHandle] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._targets = None  # found at the first sampled batch, before its hooks exist

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._due():
            return
        if self._targets is None:
            setup = _setup(trainer, pl_module, batch)
            self._num_layers = len(setup.partition.layers)
            self._targets = [(f"density/layer{layer.index}", layer.weighted[0]) for layer in setup.partition.layers]
            if setup.classifiers is not None:
                self._targets += [(f"density/classifier{i}", c) for i, c in enumerate(setup.classifiers)]
        self._counts = {key: [0, 0] for key, _ in self._targets}
        for key, module in self._targets:
            self._handles.append(module.register_forward_pre_hook(self._counter(self._counts[key])))

    @staticmethod
    def _counter(count: list[Any]) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if torch.is_grad_enabled():
                x = args[0]
                count[0] = count[0] + torch.count_nonzero(x)  # a device tensor: no sync until the batch ends
                count[1] += x.numel()

        return hook

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._advance()
        if not self._handles:
            return
        self._release()
        self.metrics = {key: float(nnz) / total for key, (nnz, total) in self._counts.items() if total}
        layers = [self.metrics.get(f"density/layer{i}") for i in range(self._num_layers)]
        if None not in layers:
            self.layer_densities = tuple(layers)  # type: ignore[arg-type]
        _log(trainer, self.metrics)

    def _release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# CostEstimate attribute -> logged name; the analytic memory is kept apart from the measured cost/memory/*
_COST_KEYS = {
    "reads": "reads",
    "writes": "writes",
    "memory_access": "memory_access",
    "additions": "additions",
    "macs": "macs",
    "memory": "memory_estimate_bytes",
}


class CostMonitor(_Sampling):
    """The paper's analytic training costs of the running configuration, against standard BPTT.

    At the first training batch the network is profiled (:func:`~lightning_tlbptt.measure.costs.profile`, one
    probe step of batch 1) from the batch's input shape, and the training hyperparameters ``k, n, T,
    classifier, classifier_pool, loss`` go to every logger (``k = T`` and ``classifier = "none"`` for
    BPTT). On sampled batches it logs the counts of one batch iteration (Eqs. 9-17) for the running
    ``(k, n, classifier)``, for standard BPTT of the same network (``k = T``, one block) and their ratios,
    plus per-block counts; the input densities come from a :class:`SpikeDensityMonitor` of the same
    Trainer when there is one (its latest sample), else from ``sparsity``. After each validation, with
    ``reference_accuracy`` given, it logs the figure of merit (Eq. 18). At the end of training the
    per-block costs go to a ``wandb.Table`` (``cost/blocks``) on a :class:`~lightning.pytorch.loggers.WandbLogger`.

    Logged keys (counts per batch iteration): ``cost/{reads,writes,memory_access,additions,macs}``,
    ``cost/memory_estimate_bytes``, the same under ``cost/bptt/``, their ratios ``cost/ratio/{reads,writes,
    memory_access,additions,macs,memory_estimate}``, ``cost/block{i}/{reads,writes,memory_access,additions,
    macs}``, and after validation ``cost/fom``, ``cost/accuracy_loss``, ``cost/fom_memory_ratio``.

    Args:
        every_n_steps: evaluate the model on one training batch in this many (it costs microseconds;
            the cadence matters only to follow the measured densities).
        reference_accuracy: accuracy of standard BPTT on the same task, as a fraction in [0, 1] (from the
            paper, or the ``val/acc`` of a BPTT reference run); enables the figure of merit.
        reference_memory_bytes: measured peak memory of that BPTT run (its ``MemoryMonitor.peak_bytes``);
            with a :class:`MemoryMonitor` in this Trainer the figure of merit then uses the measured memory
            ratio, else the analytic one (Eqs. 9-10).
        accuracy_key: the validation metric holding accuracy as a fraction.
        sparsity: input density of every layer (or one per layer) when no :class:`SpikeDensityMonitor` runs.
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        *,
        reference_accuracy: float | None = None,
        reference_memory_bytes: float | None = None,
        accuracy_key: str = "val/acc",
        sparsity: float | tuple[float, ...] = 1.0,
    ) -> None:
        super().__init__(every_n_steps)
        if reference_accuracy is not None and not 0.0 <= reference_accuracy <= 1.0:
            raise ValueError(f"reference_accuracy is a fraction in [0, 1], got {reference_accuracy}")
        self.reference_accuracy = reference_accuracy
        self.reference_memory_bytes = reference_memory_bytes
        self.accuracy_key = accuracy_key
        self.sparsity = sparsity
        self.profile: NetworkProfile | None = None
        self.estimate: CostEstimate | None = None
        self.bptt: CostEstimate | None = None
        self._setup: _Setup | None = None
        self._shape: tuple[int, int] = (0, 0)  # (T, batch size) of the latest batch

    @property
    def ratios(self) -> CostRatios | None:
        """The latest running-to-BPTT cost ratios."""
        return None if self.estimate is None or self.bptt is None else self.estimate.relative_to(self.bptt)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._setup = None  # found at the first training batch

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        due = self._due()
        self._advance()
        x = _inputs(pl_module, batch)
        self._shape = (x.shape[0], x.shape[1])
        if self.profile is None:
            # after the step: the probes may reset the network's neuron states, which the step no longer needs
            self._setup = _setup(trainer, pl_module, batch)
            self.profile = profile(self._setup.net, tuple(x.shape[2:]), classifier_pool=self._setup.classifier_pool)
            self._evaluate(trainer)
            self._log_hyperparams(trainer)
        if due:
            self._evaluate(trainer)
            _log(trainer, self.metrics)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.reference_accuracy is None or self.profile is None:
            return
        accuracy = trainer.callback_metrics.get(self.accuracy_key)
        if accuracy is None:
            return
        ratios = self.ratios
        assert ratios is not None
        measured = next((c.peak_bytes for c in trainer.callbacks if isinstance(c, MemoryMonitor)), None)
        memory = ratios.memory_ratio(measured, self.reference_memory_bytes)
        loss = self.reference_accuracy - float(accuracy)
        fom = {
            "cost/fom": ratios.figure_of_merit(loss, memory=memory),
            "cost/accuracy_loss": loss,
            "cost/fom_memory_ratio": memory,
        }
        self.metrics.update(fom)
        _log(trainer, fom)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.estimate is None:
            return
        columns = ["block", "kind", "reads", "writes", "memory_access", "additions", "macs"]
        rows = [[r.block, r.kind, r.reads, r.writes, r.memory_access, r.additions, r.macs] for r in self.estimate.rows]
        rows += [
            [r.block, r.kind, r.reads, r.writes, r.memory_access, r.additions, r.macs]
            for r in self.estimate.per_block()
        ]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key="cost/blocks", columns=columns, data=rows, step=trainer.global_step)

    def _log_hyperparams(self, trainer: pl.Trainer) -> None:
        assert self._setup is not None and self.estimate is not None
        params = {
            "k": self.estimate.k,
            "n": self.estimate.n,
            "T": self.estimate.T,
            "classifier": self._setup.classifier,
            "classifier_pool": self._setup.classifier_pool,
            "loss": self._setup.loss,
        }
        for logger in trainer.loggers:
            logger.log_hyperparams(params)

    def _sparsity(self, trainer: pl.Trainer) -> float | tuple[float, ...]:
        for callback in trainer.callbacks:
            if isinstance(callback, SpikeDensityMonitor) and callback.layer_densities is not None:
                return callback.layer_densities
        return self.sparsity

    def _evaluate(self, trainer: pl.Trainer) -> None:
        assert self.profile is not None and self._setup is not None
        T, batch_size = self._shape
        sparsity = self._sparsity(trainer)
        classifier = "random" if self._setup.classifier == "random" else "trainable"
        self.estimate = self.profile.estimate(
            T=T, k=self._setup.k, n=self._setup.n, batch_size=batch_size, classifier=classifier, sparsity=sparsity
        )
        self.bptt = self.profile.bptt(T=T, batch_size=batch_size, sparsity=sparsity)
        ratios = self.estimate.relative_to(self.bptt)
        metrics: dict[str, float] = {}
        for name, key in _COST_KEYS.items():
            metrics[f"cost/{key}"] = float(getattr(self.estimate, name))
            metrics[f"cost/bptt/{key}"] = float(getattr(self.bptt, name))
            metrics[f"cost/ratio/{key.removesuffix('_bytes')}"] = float(getattr(ratios, name))
        for row in self.estimate.per_block():
            for name in ("reads", "writes", "memory_access", "additions", "macs"):
                metrics[f"cost/block{row.block}/{name}"] = float(getattr(row, name))
        self.metrics = metrics


_OP_COUNTERS: dict[str, type[op_counter.BaseCounter]] = {
    "flops": op_counter.FlopCounter,
    "macs": op_counter.MACCounter,
    "acs": op_counter.ACCounter,
    "memory_access_bytes": op_counter.MemoryAccessCounter,
}


class OpCounterMonitor(_Sampling):
    """Operation counts measured by SpikingJelly's ``op_counter`` over one chunk's forward and backward.

    On a sampled batch a :class:`~spikingjelly.activation_based.op_counter.DispatchCounterMode` with its
    FLOP, MAC, AC (accumulate) and memory-access counters is active from the start of the batch to the
    first optimizer step: with :class:`~lightning_tlbptt.strategy.TruncatedLocalBPTT` that is the first
    chunk of ``k`` steps through every block (local classifiers and losses included); with BPTT, the
    whole sequence. The ops run between ``on_before_backward`` and ``on_after_backward`` are the
    backward's, the others the forward's. These are counts of the aten ops PyTorch ran, a cross-check
    of the analytic model's trends (:class:`CostMonitor`), not the same quantities: the analytic model
    counts DRAM traffic and event-driven additions of a dedicated processor (docs/costs.md).

    Logged keys: ``ops/{forward,backward}/{flops,macs,acs,memory_access_bytes}``.

    Args:
        every_n_steps: count one training batch in this many. Counting dispatches every aten op through
            Python and checks whether operands are binary, so the counted chunk runs several times slower.
    """

    def __init__(self, every_n_steps: int = 200) -> None:
        super().__init__(every_n_steps)
        self._mode: op_counter.DispatchCounterMode | None = None
        self._counters: dict[str, op_counter.BaseCounter] = {}
        self._totals: dict[str, dict[str, int]] = {}
        self._phase = "forward"
        self._mark: dict[str, int] = {}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._due():
            return
        self._counters = {name: cls() for name, cls in _OP_COUNTERS.items()}
        self._totals = {phase: dict.fromkeys(self._counters, 0) for phase in ("forward", "backward")}
        self._phase = "forward"
        self._mark = dict.fromkeys(self._counters, 0)
        self._mode = op_counter.DispatchCounterMode(list(self._counters.values()))
        self._mode.__enter__()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._mode is not None:
            self._switch("backward")

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._mode is not None:
            self._switch("forward")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._release()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._advance()
        if not self._totals:
            return
        self._release()
        self.metrics = {
            f"ops/{phase}/{name}": float(value)
            for phase, counts in self._totals.items()
            for name, value in counts.items()
        }
        self._totals = {}
        _log(trainer, self.metrics)

    def _switch(self, phase: str) -> None:
        """Credit the ops counted since the last switch to the phase that ran them."""
        now = {name: counter.get_total() for name, counter in self._counters.items()}
        for name, value in now.items():
            self._totals[self._phase][name] += value - self._mark[name]
        self._mark = now
        self._phase = phase

    def _release(self) -> None:
        if self._mode is not None:
            self._switch(self._phase)
            self._mode.__exit__(None, None, None)
            self._mode = None

"""The TruncatedLocalBPTT strategy: Algorithm 1 of Guo et al. (2023) around the user's own training step.

Lightning 1.x's ``truncated_bptt_steps`` called the module's ``training_step`` once per time split of the batch.
This strategy keeps that contract and adds the paper's gradient-isolated blocks, without replacing anything the
user wrote:

1. **Time.** Per batch, the module's own ``training_step`` runs once per chunk of ``k`` time steps. By default
   the cut is made where the network sees the time axis: a hook on the first module the network calls (its
   *entry*, which receives SpikingJelly's time-major ``[T, B, ...]``) passes on steps ``[t, t + k)`` only, so
   whatever the user's ``forward`` does before (transposes, encoders, repeating a static image over ``T``)
   runs unchanged and nobody declares a layout. Networks in ``step_mode='s'`` whose time loop lives in the
   module are cut in the batch instead (``split_batch``, overridable like Lightning 1.x's ``tbptt_split_batch``).
   Neuron states carry across the chunks of one batch: the user's own ``functional.reset_net`` calls are
   held off until the batch ends, and the states are detached after every chunk (``functional.detach_net``).
2. **Blocks.** The network is observed once (:func:`~lightning_tlbptt.partitioning.observe`) to find where it
   can be cut. At each block boundary a hook reads the tensor the next block receives, feeds it to that
   block's :class:`~lightning_tlbptt.classifiers.LocalClassifier`, back-propagates the local loss at once
   (the block's graph is freed before the next block runs) and hands the next block a detached copy. The loss
   the user's ``training_step`` returns trains the last block.
3. **Steps.** After each chunk: gradients checked for NaN/inf, averaged over ranks, clipped by Lightning's own
   clipping hooks, one optimizer step. Schedulers, loggers, callbacks and checkpoints are Lightning's.

``k = T`` with one block runs exactly Lightning's automatic optimisation of the same module.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, Strategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from lightning_utilities.core.apply_func import apply_to_collection
from spikingjelly.activation_based import base, functional, neuron
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_tlbptt import budget, neurons, packing, slicing
from lightning_tlbptt.classifiers import ClassifierKind, LocalClassifier
from lightning_tlbptt.layout import time_chunks
from lightning_tlbptt.losses import LocalLoss, resolve_loss
from lightning_tlbptt.memory import TensorMemoryMeter, training_state, training_state_bytes
from lightning_tlbptt.partitioning import Cut, Partition, PartitionError, _first_tensor, find_network, observe

__all__ = ["TimeSplit", "TruncatedLocalBPTT", "strip_local_classifiers"]

TimeSplit = Literal["auto", "network", "batch"]

CLASSIFIERS_ATTR = "local_classifiers"
"""Name under which the local classifiers are attached to the LightningModule while it trains."""

CHECKPOINT_KEY = "tlbptt"
"""Checkpoint entry holding the local classifiers and the settings they were made with (not in ``state_dict``)."""

_SETTINGS = ("n", "classifier", "classifier_pool", "seed")


class _Captured(Exception):
    """Raised by a hook to stop the user's training step once the network's input is known."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.args, self.kwargs = args, kwargs


def _ignore(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``LightningModule.log`` while the network's input is captured before training starts."""


def _keep_state() -> None:
    """Stands in for ``MemoryModule.reset`` while the chunks of one batch run: state carries across them."""


class TruncatedLocalBPTT(DDPStrategy):
    """Train a SpikingJelly network with temporally-truncated local BPTT (Guo et al., 2023).

    Change one line of a Lightning project, ``Trainer(strategy=TruncatedLocalBPTT(k=5, n=2))``: the module's
    own ``training_step`` (its loss, its logged metrics) runs once per chunk of ``k`` time steps with an
    optimizer step after each, and the network is cut into gradient-isolated blocks of ``n`` layers, each
    block but the last trained by a local classifier. See the module docstring for how.

    Validation, test and predict run the module unchanged. After ``fit`` the module is handed back as it came
    (automatic optimisation, no local classifiers, SpikingJelly's own neurons); checkpoints keep the local
    classifiers outside the module's ``state_dict``, so a plain ``Trainer`` can validate from them.

    With ``devices > 1`` it launches one process per device (DDP): gradients are averaged over ranks before
    every optimizer step. With one device there is no process group and no launcher.

    Args:
        k: time steps per truncation interval (chunk). When ``k`` does not divide ``T`` the last chunk is
            shorter. ``"auto"``: the largest ``k <= T`` that fits ``memory_budget`` (:mod:`~lightning_tlbptt.budget`),
            chosen at setup from two chunks measured on the device and then readable as ``strategy.k``.
        memory_budget: bytes (or ``"2GiB"``, ``"512MiB"``) the training may use, with ``k="auto"``.
        n: hidden layers per block; ``None`` (or ``n >= number of hidden layers``) gives one block (no local
            classifier).
            A layer is a weighted module (Conv/Linear) with what follows it, or a group that cannot be cut
            (a residual block).
        classifier: ``"trainable"`` local classifiers, or ``"random"`` (every parameter frozen, from ``seed``).
        loss: loss of the local classifiers: ``"mse"`` (the paper's Eq. 3, firing rate against one-hot,
            the default: a local classifier's output is spikes, and the paper trains LeNet/AlexNet with it),
            ``"ce"`` (the paper's choice for VGG11/ResNet18) or a callable ``(out_seq [k, B, C], target)
            -> scalar``. The last block is trained by the loss your ``training_step`` returns.
        network: attribute name of the network in the LightningModule; by default the one child holding
            SpikingJelly neurons.
        time_split: ``"network"`` cuts the time axis at the network's entry (needs multi-step neurons),
            ``"batch"`` cuts the batch along ``time_dim`` (:meth:`split_batch`), ``"auto"`` picks
            ``"network"`` unless every neuron runs in ``step_mode='s'``.
        time_dim: the batch's time axis for ``time_split="batch"`` (1: ``[B, T, ...]``, tonic's layout).
        target: ``batch -> target`` for the local classifiers (class indices ``[B]`` or per-class targets
            ``[B, C]``); default: ``batch[1]``, or ``batch["target" | "label" | "labels" | "y"]``.
        classifier_pool: spatial size the local classifiers pool feature maps down to.
        seed: seed of the local classifiers' initial weights.
        fast_neurons: during ``fit``, run SpikingJelly ``LIFNode`` neurons with the rectangular surrogate (the
            paper's neuron) through :class:`~lightning_tlbptt.neurons.RectLIFFunction`: the same spikes bit for
            bit, one byte saved per neuron-step instead of four, faster on CPU than SpikingJelly's loop.
        silent_steps: warn once when the network's output (if it is spikes) or a local classifier has not
            spiked for this many optimizer steps in a row; ``None`` turns the check off.
        pack_spikes: save the spikes that layers keep for backward at one bit each
            (:func:`~lightning_tlbptt.packing.binary_saved_tensors`): the same gradients bit for bit, about 11x less
            saved for backward at k = 10, but a few percent slower on CPU and the peak is set by other tensors, so
            it is off by default (``benchmarks/packing.py``). Average pools keep only the shape of their input
            for backward either way (:data:`~lightning_tlbptt.packing.SHAPE_ONLY`).
        slice_bytes: run the widest layer's forward over its chunk in time slices whose widest tensor is about
            this many bytes (:mod:`~lightning_tlbptt.slicing`), so that its conv output and spikes exist one slice
            at a time, and every other layer in slices as long as stay within the peak that leaves (narrow layers
            run whole); ``None`` runs every layer over the whole chunk at once. Layers with batch normalisation,
            and modules SpikingJelly does not run step by step, always run whole.
        **kwargs: passed to :class:`~lightning.pytorch.strategies.DDPStrategy` (``start_method``,
            ``process_group_backend``, ``timeout``, ...).
    """

    strategy_name = "tlbptt"

    def __init__(
        self,
        k: int | Literal["auto"] = 5,
        n: int | None = 2,
        *,
        memory_budget: int | str | None = None,
        classifier: ClassifierKind = "trainable",
        loss: Literal["mse", "ce"] | LocalLoss = "mse",
        network: str | None = None,
        time_split: TimeSplit = "auto",
        time_dim: int = 1,
        target: Callable[[Any], Tensor] | None = None,
        classifier_pool: int = 4,
        seed: int = 0,
        fast_neurons: bool = True,
        silent_steps: int | None = 200,
        pack_spikes: bool = False,
        slice_bytes: int | str | None = "2MiB",
        **kwargs: Any,
    ) -> None:
        for name, value in (("k", k), ("n", n)):
            if (name, value) in (("k", "auto"), ("n", None)):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                also = " or 'auto'" if name == "k" else " or None (one block)"
                raise ValueError(f"{name} must be a positive int{also}, got {value!r}")
        if (k == "auto") != (memory_budget is not None):
            raise ValueError(
                "k='auto' chooses k from memory_budget and memory_budget only serves k='auto': pass both, e.g. "
                f"TruncatedLocalBPTT(k='auto', memory_budget='2GiB'), got k={k!r}, memory_budget={memory_budget!r}"
            )
        if classifier not in ("trainable", "random"):
            raise ValueError(f"classifier must be 'trainable' or 'random', got {classifier!r}")
        if time_split not in ("auto", "network", "batch"):
            raise ValueError(f"time_split must be 'auto', 'network' or 'batch', got {time_split!r}")
        if silent_steps is not None and (not isinstance(silent_steps, int) or silent_steps < 1):
            raise ValueError(f"silent_steps must be a positive int or None, got {silent_steps!r}")
        super().__init__(**kwargs)
        self.k = k
        self._k_auto = k == "auto"
        self.n = n
        self.memory_budget = None if memory_budget is None else budget.parse_bytes(memory_budget)
        self.memory_model: budget.MemoryModel | None = None
        """With ``k='auto'``: the fitted ``bytes(k)`` the choice of ``k`` was made from."""
        self.memory_used: int | None = None
        """With ``k='auto'``: the peak bytes of the first batch at the chosen ``k``, once it has run."""
        self.classifier = classifier
        self.loss_fn: LocalLoss = resolve_loss(loss)
        self.network = network
        self.time_split = time_split
        self.time_dim = time_dim
        self.target = target
        self.classifier_pool = classifier_pool
        self.seed = seed
        self.fast_neurons = fast_neurons
        self.silent_steps = silent_steps
        self.pack_spikes = pack_spikes
        self.slice_bytes = None if slice_bytes is None else budget.parse_bytes(slice_bytes, "slice_bytes")
        self._runs: list[slicing.Run] = []
        self.partition: Partition | None = None
        self._net: nn.Module | None = None
        self._classifiers: nn.ModuleList | None = None
        self._split: Literal["network", "batch"] = "network"
        self._fingerprint: list[tuple[str, type]] = []
        self._checked_first_batch = False
        self._window = (0, 0)
        self._seen_T: int | None = None
        self._chunk_count = 0  # chunks of the current batch under the batch split
        self._local_losses: list[Tensor] = []
        self._readouts: list[list[Tensor]] = []
        self._spiked: dict[str, Tensor] = {}
        self._silent: dict[str, list[int]] = {}
        self._warned_silent: set[str] = set()
        self._silent_since_start = 0  # optimizer steps this fit: a neuron silent for all of them never fired
        self._output_spikes = False
        self._probe: tuple[Any, tuple[Any, ...], dict[str, Any]] | None = None
        self._probe_T: int | None = None
        self._backward_fn: Callable[[Tensor], None] = _plain_backward
        self._budget_check = False
        self._patched_scheduler_update: Any = None

    # --- Lightning plumbing -------------------------------------------------------------------------------------

    @override
    def _configure_launcher(self) -> None:
        # One process needs no launcher, and Lightning's would call torch.set_num_threads(<cpu count>) unless
        # OMP_NUM_THREADS is set: the user's thread count would change, as under no single-device strategy.
        if self.num_nodes * self.num_processes > 1:
            super()._configure_launcher()

    @override
    def setup_distributed(self) -> None:
        # one process: no process group (and no DDP banner), as with a single-device strategy
        if self.num_nodes * self.num_processes > 1:
            super().setup_distributed()
        else:
            self.set_world_ranks()

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # the local classifiers are created in `setup`; a checkpoint holding them can only load after
        return True

    @override
    def connect(self, model: pl.LightningModule) -> None:
        super().connect(model)
        trainer = model._trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return
        if trainer.accumulate_grad_batches != 1:
            raise MisconfigurationException(
                f"TruncatedLocalBPTT steps the optimizer after every chunk of k={self.k} time steps, so "
                f"`Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches})` cannot be honoured. Remove "
                "it; to see more samples per step use a larger batch (or a larger k)."
            )
        if not model.automatic_optimization:
            raise MisconfigurationException(
                f"{type(model).__name__} sets `automatic_optimization = False`: TruncatedLocalBPTT calls your "
                "training_step once per chunk and steps the optimizer itself. Remove that line and the manual "
                "backward/step calls from training_step; return the loss."
            )

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        module = self.lightning_module
        assert module is not None
        if trainer.state.fn != TrainerFn.FITTING:
            self._setup_devices(trainer)
            return
        if self.world_size == 1:
            # Lightning injects a shuffling DistributedSampler for any DDP strategy; on one device the
            # user's own DataLoader (and its order) must be used as with a single-device strategy.
            trainer._accelerator_connector.use_distributed_sampler = False
        self._checked_first_batch = False
        self._silent, self._warned_silent, self._silent_since_start = {}, set(), 0
        if self._k_auto:
            self.k = "auto"  # chosen anew for every fit
        name, self._net = find_network(module, self.network, exclude=(CLASSIFIERS_ATTR,))
        self._split = self._resolve_split(self._net)
        if self._split == "batch" and self.memory_budget is not None:
            raise MisconfigurationException(
                "k='auto' measures chunks cut where the network receives the time axis; with time_split='batch' "
                "(single-step networks) pass an int k."
            )
        inputs = self._observe(module, self._first_batch(trainer), self._net)
        self._classifiers = self._make_classifiers(inputs)
        module.add_module(CLASSIFIERS_ATTR, self._classifiers)
        if self.fast_neurons:
            neurons.accelerate(self._net)
            neurons.accelerate(getattr(module, CLASSIFIERS_ATTR))
        # Optimizers and schedulers are configured the automatic way (monitor, frequency, plateau kept);
        # training then runs under manual optimisation, where Lightning does no backward or step of its own.
        try:
            self._setup_devices(trainer)
        except RuntimeError as err:
            if "multiple optimizers" not in str(err):
                raise
            raise MisconfigurationException(
                "TruncatedLocalBPTT steps one optimizer per chunk; configure_optimizers returned several. Return a "
                "single optimizer (use parameter groups for different learning rates)."
            ) from err
        module.automatic_optimization = False
        self._check_optimizers(module)
        if self.k == "auto":
            self.k = self._choose_k(module)
        self._probe = None
        self._patch_scheduler_updates(trainer)
        trainer.callbacks.append(_CheckpointLocalClassifiers(self))
        assert self.partition is not None
        blocks = self.partition.blocks
        rank_zero_info(
            f"TruncatedLocalBPTT(k={self.k}, n={self.n}, classifier={self.classifier!r}): network {name!r}, "
            f"{len(self.partition.layers)} layers in {len(blocks)} block(s): "
            + " | ".join(",".join(b.names) for b in blocks)
        )

    def _setup_devices(self, trainer: pl.Trainer) -> None:
        if self.world_size > 1:
            super().setup(trainer)
        else:  # one device: exactly what a single-device strategy does (no process group to sync over)
            Strategy.setup(self, trainer)

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        # never a DistributedDataParallel wrapper (see configure_ddp)
        return model

    @override
    def teardown(self) -> None:
        # Hand the module back as it came: automatic optimisation (keeping the step count readable), SpikingJelly's
        # own neurons, no local classifiers, no hooks.
        module = self.lightning_module
        if module is not None and hasattr(module, CLASSIFIERS_ATTR):
            trainer = module._trainer
            if trainer is not None and not module.automatic_optimization:
                loop = trainer.fit_loop.epoch_loop
                steps = loop.manual_optimization.optim_step_progress.total
                done = loop.automatic_optimization.optim_progress.optimizer.step.total
                done.ready, done.completed = steps.ready, steps.completed
                trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, _CheckpointLocalClassifiers)]
                if self._patched_scheduler_update is not None:
                    del loop._update_learning_rates
                    self._patched_scheduler_update = None
            module.automatic_optimization = True
            neurons.restore(module)
            delattr(module, CLASSIFIERS_ATTR)
        super().teardown()

    @override
    def configure_ddp(self) -> None:
        # No DistributedDataParallel wrapper: its reducer expects one backward per forward, while each
        # chunk runs one backward per block. Gradients are averaged once per optimizer step instead, and
        # the network starts from rank 0's weights as under DDP (local classifiers start from `seed`).
        if self.world_size > 1:
            from lightning.pytorch.overrides.distributed import _sync_module_states

            assert self.lightning_module is not None
            _sync_module_states(self.lightning_module)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        # the local classifiers are the strategy's: saved under CHECKPOINT_KEY, so the module's own state_dict
        # loads strictly into the module without them (validate/test/predict with a plain Trainer)
        prefix = f"{CLASSIFIERS_ATTR}."
        return {key: v for key, v in super().lightning_module_state_dict().items() if not key.startswith(prefix)}

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        assert module is not None
        classifiers = getattr(module, CLASSIFIERS_ATTR, None)
        saved = checkpoint.get(CHECKPOINT_KEY)
        if classifiers is None or saved is None:
            super().load_model_state_dict(checkpoint, strict=strict)
            return
        settings = {name: getattr(self, name) for name in _SETTINGS}
        changed = {k: (v, settings[k]) for k, v in saved["settings"].items() if settings.get(k) != v}
        if changed:
            what = ", ".join(f"{k}={old!r} in the checkpoint but {k}={new!r} now" for k, (old, new) in changed.items())
            raise MisconfigurationException(
                f"cannot resume: the checkpoint's local classifiers were made with other settings ({what}). Resume "
                "with the checkpoint's settings, or start a new fit from its weights (load the module's state_dict "
                "without ckpt_path)."
            )
        result = module.load_state_dict(checkpoint["state_dict"], strict=False)
        missing = [key for key in result.missing_keys if not key.startswith(f"{CLASSIFIERS_ATTR}.")]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"the checkpoint does not fit {type(module).__name__}: missing {missing[:5]}, unexpected "
                f"{result.unexpected_keys[:5]}"
            )
        classifiers.load_state_dict(saved["state_dict"])

    # --- the training step --------------------------------------------------------------------------------------

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        module = self.lightning_module
        assert module is not None and self._net is not None
        batch, rest = (args[0], args[1:]) if args else (kwargs.pop("batch"), ())
        batch_idx = rest[0] if rest else kwargs.get("batch_idx", 0)
        if _batch_size(batch) == 0:
            raise ValueError(
                f"batch {batch_idx} is empty (its first tensor has 0 samples): nothing to train on. Check the "
                "dataset and the sampler, or drop empty batches (DataLoader(drop_last=True))."
            )
        if not self._checked_first_batch:
            self._reobserve_if_changed(module, batch)
        classifiers: nn.ModuleList = getattr(module, CLASSIFIERS_ATTR)
        nets = (self._net, classifiers)
        for net in nets:
            functional.reset_net(net)
        self._backward_fn = module.manual_backward
        output: STEP_OUTPUT = None
        totals = torch.zeros(len(classifiers), device=self.root_device)  # read once per batch, when logged
        n_chunks = 0
        with self._checking_budget(module), self._holding_states(nets), self._cuts() as target_slot:
            for chunk_index, chunk in enumerate(self._chunks(batch)):
                if len(classifiers) and (chunk_index == 0 or self._split == "batch"):
                    # the network split hands every chunk the same batch: check and move its target once
                    target_slot[0] = self._local_target(chunk, batch_idx)
                self._seen_T = None
                with self._packing(module):
                    output = super().training_step(chunk, *rest, **kwargs)
                    if self._split == "network":
                        self._check_window()
                    if chunk_index == 0 and self.world_size > 1:
                        self._agree_on_chunks(batch_idx)
                    totals += self._backward(module, output, target_slot[0])
                self._optimizer_step(module, chunk_index, batch_idx, output)
                for net in nets:
                    _detach_states(net)
                n_chunks += 1
        for net in nets:  # free the last chunk's states now rather than when the next batch starts
            functional.reset_net(net)
        self._checked_first_batch = True
        for i, value in enumerate(totals / max(n_chunks, 1)):
            module.log(f"train/block{i}/loss", value, batch_size=_batch_size(batch), sync_dist=self.world_size > 1)
        return apply_to_collection(output, Tensor, lambda t: t.detach())

    def split_batch(self, batch: Any, k: int) -> list[Any]:
        """Cut ``batch`` into chunks of ``k`` steps along ``time_dim`` (``time_split="batch"``).

        Every tensor whose ``time_dim`` has the length of the first tensor's is cut; the others (labels
        ``[B]``, one-hot targets) are passed whole to every chunk. If the LightningModule defines
        ``tbptt_split_batch(batch, split_size)`` (Lightning 1.x's hook), that is used instead. Override
        either for other layouts.
        """
        module = self.lightning_module
        hook = getattr(module, "tbptt_split_batch", None)
        if callable(hook):
            return list(hook(batch, k))
        first = next(iter(_tensors(batch)), None)
        if first is None or first.dim() <= self.time_dim:
            raise ValueError(
                f"time_split='batch' cuts the batch along time_dim={self.time_dim}, but its first tensor is "
                f"{_shape(first)}. Yield [B, T, ...] batches (time_dim=1), pass time_dim=, or define "
                "tbptt_split_batch(batch, split_size) on your LightningModule."
            )
        steps = first.shape[self.time_dim]
        return [
            apply_to_collection(
                batch,
                Tensor,
                lambda t, s=start, e=stop: (
                    t.narrow(self.time_dim, s, e - s)
                    if t.dim() > max(self.time_dim, 1) and t.shape[self.time_dim] == steps
                    else t
                ),
            )
            for start, stop in time_chunks(steps, k)
        ]

    @property
    def spiking_network(self) -> nn.Module | None:
        """The network being trained, once ``setup`` has found it."""
        return self._net

    @property
    def local_classifiers(self) -> nn.ModuleList | None:
        """The local classifiers of the last fit (one per block but the last); kept after ``fit`` hands the
        module back without them."""
        return self._classifiers

    def _chunks(self, batch: Any) -> Iterator[Any]:
        if self._split == "batch":
            chunks = self.split_batch(batch, self.k)
            if not chunks:
                raise ValueError("the batch is empty along its time axis: nothing to train on.")
            self._chunk_count = len(chunks)
            yield from chunks
            return
        start = 0
        while True:
            self._window = (start, start + self.k)
            yield batch
            assert self._seen_T is not None
            start += self.k
            if start >= self._seen_T:
                return

    def _check_window(self) -> None:
        if self._seen_T is None:
            module = self.lightning_module
            raise RuntimeError(
                f"{type(module).__name__}.training_step did not call the network {type(self._net).__name__} "
                "(or called it without reaching its first module): TruncatedLocalBPTT cuts the time axis where "
                "the network receives it. Call the network in training_step, or use time_split='batch'."
            )

    def _agree_on_chunks(self, batch_idx: int) -> None:
        """Every rank must run as many chunks (optimizer steps, gradient all-reduces) as the others.

        One small all-reduce per batch; on disagreement every rank raises the same error at once instead of
        waiting in the next gradient all-reduce until the process group times out.
        """
        chunks = -(-int(self._seen_T or 0) // self.k) if self._split == "network" else self._chunk_count
        counts = torch.tensor([chunks, -chunks], device=self.root_device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        most, fewest = int(counts[0]), -int(counts[1])
        if most != fewest:
            raise ValueError(
                f"ranks disagree on the number of chunks of batch {batch_idx}: between {fewest} and {most} chunks "
                f"of k={self.k} steps (this rank: {chunks}), so their optimizer steps and gradient all-reduces "
                "cannot pair up. Give every rank batches of the same length T (pad, or bucket sequences by length "
                "across ranks), or train on one device."
            )

    def _backward(self, module: pl.LightningModule, output: STEP_OUTPUT, target: Tensor | None) -> Tensor:
        """Back-propagate the user's loss (last block) and any deferred local losses; return the local ones."""
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if loss is not None:
            if not isinstance(loss, Tensor) or not loss.requires_grad:
                raise MisconfigurationException(
                    f"training_step must return a loss tensor that requires grad (or a dict with one under "
                    f"'loss', or None to skip the chunk); got {_describe(loss)}."
                )
            module.manual_backward(loss)
        losses = self._local_losses
        for i, steps in enumerate(self._readouts):  # single-step networks: one loss over the chunk's steps
            if steps:
                assert target is not None
                local = self.loss_fn(torch.cat(steps), target)
                module.manual_backward(local)
                losses[i] = losses[i] + local.detach()
                self._note_spikes(f"the local classifier of block {i}", torch.cat(steps))
                steps.clear()
        done = torch.stack(losses) if losses else torch.zeros(0, device=self.root_device)
        self._local_losses = [torch.zeros((), device=self.root_device) for _ in losses]
        return done

    def _optimizer_step(self, module: pl.LightningModule, chunk_index: int, batch_idx: int, output: Any) -> None:
        optimizer = module.optimizers()
        assert not isinstance(optimizer, list)
        self._check_gradients(module, chunk_index, batch_idx)
        self._reduce_gradients(module)
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if loss is None:  # training_step returned None: skip this chunk's step, as Lightning skips a batch
            optimizer.zero_grad()
            return
        # Lightning clips gradients (through the module's configure_gradient_clipping) only under automatic
        # optimisation, right after on_before_optimizer_step; its precision plugins skip a step whose closure
        # returned None. So the step runs flagged automatic, with a closure that returns the chunk's loss.
        module.automatic_optimization = True
        try:
            optimizer.step(closure=lambda: loss)
        finally:
            module.automatic_optimization = False
        optimizer.zero_grad()

    # --- hooks in the user's forward ----------------------------------------------------------------------------

    def _packing(self, module: nn.Module) -> AbstractContextManager[Any]:
        # average pools' inputs are kept as shapes whether or not spikes are packed to bits
        return packing.binary_saved_tensors(module, bits=self.pack_spikes)

    @contextmanager
    def _holding_states(self, nets: tuple[nn.Module, ...]) -> Iterator[None]:
        """Neuron states (and dropout masks) carry across the chunks of a batch: user resets wait until it ends."""
        memory = [m for net in nets for m in net.modules() if isinstance(m, base.MemoryModule)]
        for m in memory:
            m.reset = _keep_state
        try:
            yield
        finally:
            for m in memory:
                vars(m).pop("reset", None)

    @contextmanager
    def _cuts(self) -> Iterator[list[Tensor | None]]:
        """Install the time cut and the block boundaries on the network for one batch; always removed after."""
        assert self.partition is not None and self._net is not None
        module = self.lightning_module
        classifiers: nn.ModuleList = getattr(module, CLASSIFIERS_ATTR)
        target: list[Tensor | None] = [None]
        calls: dict[int, int] = {}
        per_step = self.partition.step_mode == "s"
        self._local_losses = [torch.zeros((), device=self.root_device) for _ in classifiers]
        self._readouts = [[] for _ in classifiers]

        def start_of_call(_: nn.Module, args: tuple[Any, ...]) -> None:
            calls.clear()

        def end_of_call(_: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if isinstance(output, Tensor):
                self._note_spikes("the network's output layer", output)

        def occurrence(cut: Cut) -> bool:
            seen = calls.get(id(cut.module), 0)
            calls[id(cut.module)] = seen + 1
            return seen == cut.occurrence

        def entry(cut: Cut, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not occurrence(cut):
                return None
            x = args[0]
            if self._seen_T is None:
                self._seen_T = x.shape[0]
            start, stop = self._window
            return (x[start:stop], *args[1:]), kwargs

        def boundary(index: int, cut: Cut, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not occurrence(cut):
                return None
            args, kwargs, h = _take_tensor(args, kwargs)
            run = reading.get(index)
            readout = run.take_readout() if run is not None else None
            if readout is None:
                readout = classifiers[index](h.unsqueeze(0) if per_step else h)
            if per_step:
                self._readouts[index].append(readout)
            else:
                assert target[0] is not None
                local = self.loss_fn(readout, target[0])
                self._backward_fn(local)  # this block's graph is freed before the next block runs
                self._local_losses[index] = self._local_losses[index] + local.detach()
                self._note_spikes(f"the local classifier of block {index}", readout)
            return _put_tensor(args, kwargs, h.detach())

        handles: list[RemovableHandle] = [self._net.register_forward_pre_hook(start_of_call)]
        if self._output_spikes:
            handles.append(self._net.register_forward_hook(end_of_call))
        # a hook on the first module of a run must see the whole chunk, not each slice: the run calls it
        first_of_run = {id(run.modules[0]): run for run in self._runs}
        # a run whose output goes straight into the next block reads it out slice by slice (slicing.Run.readout)
        feeding = {id(run.parent[run.stop]): run for run in self._runs if run.stop < len(run.parent)}
        reading: dict[int, slicing.Run] = {}
        for block in self.partition.blocks[1:]:
            assert block.start is not None
            run = feeding.get(id(block.start.module))
            if run is not None and block.start.occurrence == 0 and not per_step:
                run.readout = classifiers[block.index - 1]
                reading[block.index - 1] = run

        def install(module: nn.Module, hook: slicing.PreHook, prepend: bool = False) -> None:
            run = first_of_run.get(id(module))
            if run is not None:
                run.before.insert(0, hook) if prepend else run.before.append(hook)
            else:
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True, prepend=prepend))

        entry_cut = self.partition.entry
        if self._split == "network" and entry_cut is not None:
            install(entry_cut.module, _bind(entry, entry_cut), prepend=True)
        for block in self.partition.blocks[1:]:
            assert block.start is not None
            install(block.start.module, _bind(boundary, block.index - 1, block.start))
        try:
            with slicing.installed(self._runs):
                yield target
        finally:
            for handle in handles:
                handle.remove()

    # --- observing the network ----------------------------------------------------------------------------------

    def _resolve_split(self, net: nn.Module) -> Literal["network", "batch"]:
        if self.time_split != "auto":
            return self.time_split
        modes = {m.step_mode for m in net.modules() if isinstance(m, base.StepModule) and hasattr(m, "v_threshold")}
        return "batch" if modes == {"s"} else "network"

    def _first_batch(self, trainer: pl.Trainer) -> Any:
        """One training batch, fetched before the loop starts: the network is observed before optimizers exist."""
        loader = trainer.fit_loop._data_source.dataloader()
        combined = CombinedLoader(loader, "max_size_cycle")
        # the user's RNG stream (shuffling, dropout) continues as if this batch had not been drawn
        with torch.random.fork_rng(devices=[]):
            iter(combined)
            try:
                batch, _, _ = next(combined)
            except StopIteration:
                raise ValueError("the training dataloader is empty: nothing to train on.") from None
        module = self.lightning_module
        assert module is not None
        device = next(module.parameters(), torch.empty(0)).device
        return module._apply_batch_transfer_handler(batch, device=device)

    def _observe(self, module: pl.LightningModule, batch: Any, net: nn.Module) -> list[Tensor]:
        """Run the user's training_step up to the network call, then observe the network on that input."""
        if self._split == "batch":
            chunks = self.split_batch(batch, self.k)
            if not chunks:
                raise ValueError("the batch is empty along its time axis: nothing to train on.")
            batch = chunks[0]

        def capture(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            raise _Captured(args, kwargs)

        handle = net.register_forward_pre_hook(capture, with_kwargs=True)
        # outside Lightning's loop `self.log` raises; what training_step logs before the network runs is dropped
        module.log = module.log_dict = _ignore  # type: ignore[method-assign]
        try:
            with torch.no_grad(), self._holding_states((net,)):
                module.training_step(batch, 0)
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
        self._probe = (batch, args, kwargs)
        found = observe(net, self.n, args, kwargs, slice_time=self._split == "network")
        self._probe_T = found.T
        entry_shape = found.entry_shape
        self.partition = found.partition
        self._fingerprint = _fingerprint(net)
        layers = [layer.modules for layer in found.partition.layers]
        self._runs = slicing.find_runs(net, layers, self.slice_bytes) if self.slice_bytes else []
        # the output is spikes when the last module the output layer runs is a neuron
        self._output_spikes = isinstance(found.partition.layers[-1].modules[-1], neuron.BaseNode)
        if found.T is not None and isinstance(self.k, int) and self.k > found.T:
            raise ValueError(
                f"k={self.k} is larger than the number of time steps T={found.T} the network receives (its first "
                f"module, {found.partition.entry.name if found.partition.entry else '?'}, gets [T, B, ...]); choose "
                f"k <= {found.T}."
            )
        if entry_shape is not None and len(entry_shape) > 1 and entry_shape[0] == entry_shape[1]:
            rank_zero_warn(
                f"the network's first module receives {list(entry_shape)}: as many time steps as samples, so "
                "TruncatedLocalBPTT cannot tell that its first axis is time. SpikingJelly expects [T, B, ...]; if "
                "your data is [B, T, ...], transpose it before it reaches the network (or the results are wrong)."
            )
        return found.block_inputs

    def _reobserve_if_changed(self, module: pl.LightningModule, batch: Any) -> None:
        """Blocks are formed after ``on_fit_start`` hooks: a network rewrapped there (memopt) is observed again."""
        assert self._net is not None and self.partition is not None
        if _fingerprint(self._net) == self._fingerprint:
            return
        before = self.partition
        restore = neurons.is_accelerated(self._net)
        neurons.restore(self._net)
        inputs = self._observe(module, batch, self._net)
        if restore:
            neurons.accelerate(self._net)
        if len(self.partition.blocks) != len(before.blocks):
            raise PartitionError(
                f"the network changed after setup (e.g. memopt.optimize_memory in on_fit_start) and now has "
                f"{len(self.partition.blocks)} blocks instead of {len(before.blocks)}: a wrapped module spans a "
                "block boundary. Choose n so that block boundaries fall between wrapped modules, or wrap after "
                "training."
            )
        self._build_classifiers(getattr(module, CLASSIFIERS_ATTR), inputs)

    def _make_classifiers(self, inputs: list[Tensor]) -> nn.ModuleList:
        """One local classifier per block but the last, built on what the block handed on in the probe."""
        assert self.partition is not None
        part = self.partition
        classifiers = nn.ModuleList(
            LocalClassifier(
                part.num_classes,
                part.neuron_template,
                kind=self.classifier,
                pool=self.classifier_pool,
                seed=self.seed + block.index,
            )
            for block in part.blocks[:-1]
        )
        self._build_classifiers(classifiers, inputs)
        return classifiers

    def _build_classifiers(self, classifiers: nn.ModuleList, inputs: list[Tensor]) -> None:
        """Run each classifier once on its block's probe output: sizes its lazy layer, names a misfit."""
        assert self.partition is not None
        with torch.no_grad():
            for b, (classifier, h) in enumerate(zip(classifiers, inputs, strict=True)):
                try:
                    classifier(h.unsqueeze(0) if self.partition.step_mode == "s" else h)
                except RuntimeError as err:
                    raise ValueError(
                        f"the local classifier of block {b} cannot read the block's output of shape "
                        f"{list(h.shape)} (one time step): {err}"
                    ) from err
        functional.reset_net(classifiers)

    # --- choosing k from a memory budget ------------------------------------------------------------------------

    def _choose_k(self, module: pl.LightningModule) -> int:
        assert self._probe is not None and self.memory_budget is not None
        batch, args, kwargs = self._probe
        steps = self._probe_T
        assert steps is not None  # a network time split saw T
        k, model = budget.choose_k(
            lambda k: self._measure_chunk(module, batch, args, kwargs, k),
            steps,
            self.memory_budget,
            batch_size=_batch_size(batch),
            state_bytes=training_state_bytes(module.parameters(), self.optimizers[0]),
        )
        if self.world_size > 1:  # every rank must step as often as the others
            agreed = torch.tensor([k], device=self.root_device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            k = int(agreed)
        self.memory_model = model
        self._budget_check = True
        rank_zero_info(
            f"TruncatedLocalBPTT(k='auto'): k={k} of T={steps} fits memory_budget="
            f"{budget.format_bytes(self.memory_budget)}: predicted {budget.format_bytes(model(k))} "
            f"({budget.format_bytes(model.fixed)} + {budget.format_bytes(model.per_step)} per step, measured "
            + ", ".join(f"k={m}: {budget.format_bytes(b)}" for m, b in model.measured)
            + ")"
        )
        return k

    def _measure_chunk(
        self, module: pl.LightningModule, batch: Any, args: tuple[Any, ...], kwargs: dict[str, Any], k: int
    ) -> int:
        """Peak bytes of one training chunk of ``k`` steps on the device, leaving no trace (weights, statistics,
        gradients, random stream, neuron states).

        The chunk measured is a second one, as every chunk of training but the first: it starts with every layer's
        neuron states alive, where a first chunk makes a layer's states only when it reaches that layer (on the
        AlexNet benchmark at ``k = 1`` that was 2.6 MiB of 19, more than the budget's margin)."""
        assert self._net is not None and self._classifiers is not None
        device = self.root_device
        to_device = functools.partial(apply_to_collection, dtype=Tensor, function=lambda t: t.to(device))
        args, kwargs, batch = to_device(args), to_device(kwargs), to_device(batch)
        nets = (self._net, self._classifiers)
        buffers = {name: b.clone() for name, b in module.named_buffers()}
        cuda = device.type == "cuda"
        try:
            with (
                torch.random.fork_rng(devices=[device] if cuda else []),
                self._holding_states(nets),
                self._cuts() as target,
            ):
                target[0] = self._local_target(batch, 0) if len(self._classifiers) else None
                for net in nets:
                    functional.reset_net(net)
                second = (k, 2 * k) if 2 * k <= (self._probe_T or k) else (0, k)
                with TensorMemoryMeter() as live:
                    for window in (0, k), second:
                        # the measured chunk starts with what the first left alive: every layer's neuron states
                        live.peak_bytes = live.current_bytes
                        if cuda:
                            torch.cuda.synchronize(device)
                            torch.cuda.reset_peak_memory_stats(device)
                        self._window, self._seen_T = window, None
                        with self._packing(module):
                            out = _first_tensor(self._net(*args, **kwargs))
                            assert out is not None
                            out.float().sum().backward()  # stands in for the user's loss on the last block
                        del out
                        module.zero_grad(set_to_none=True)  # as the optimizer step leaves them
                        for net in nets:
                            _detach_states(net)
                # the optimizer's state is not allocated before its first step: counted as it will be
                state = training_state(module.parameters(), self.optimizers[0])
                if cuda:
                    return torch.cuda.max_memory_allocated(device) + state.optimizer_state
                return live.peak_bytes + state.params + state.optimizer_state
        finally:
            with torch.no_grad():
                for name, b in module.named_buffers():
                    b.copy_(buffers[name])
            module.zero_grad(set_to_none=True)
            for net in nets:
                functional.reset_net(net)
            self._spiked.clear()

    @contextmanager
    def _checking_budget(self, module: pl.LightningModule) -> Iterator[None]:
        """Around the first batch after ``k`` was chosen: its real peak against the budget (CUDA:
        ``max_memory_allocated``; CPU: every live tensor plus what was allocated before the batch)."""
        if not self._budget_check:
            yield
            return
        cuda = self.root_device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.root_device)
        before = training_state(module.parameters(), self.optimizers[0])
        allocated = before.params + (before.optimizer_state if self.optimizers[0].state else 0)
        with TensorMemoryMeter() as live:
            yield
        self._budget_check = False
        assert self.memory_budget is not None and self.memory_model is not None and isinstance(self.k, int)
        used = torch.cuda.max_memory_allocated(self.root_device) if cuda else live.peak_bytes + allocated
        self.memory_used = used
        if used > self.memory_budget:
            rank_zero_warn(
                f"the first batch at k={self.k} used {budget.format_bytes(used)}, over memory_budget="
                f"{budget.format_bytes(self.memory_budget)} (predicted {budget.format_bytes(self.memory_model(self.k))}"
                "): your training_step's loss or the allocator keeps more than the measured chunk. Lower "
                "memory_budget or pass a smaller k."
            )

    # --- checks -------------------------------------------------------------------------------------------------

    def _local_target(self, batch: Any, batch_idx: int) -> Tensor:
        """The local classifiers' target for this batch, checked against the network's output width."""
        assert self.partition is not None
        if self.target is not None:
            target = self.target(batch)
        elif isinstance(batch, (tuple, list)) and len(batch) > 1:
            target = batch[1]
        elif isinstance(batch, Mapping):
            target = next((batch[key] for key in ("target", "label", "labels", "y") if key in batch), None)
        else:
            target = None
        if not isinstance(target, Tensor):
            raise ValueError(
                f"the local classifiers need the batch's target but batch[1] (or batch['target'|'label'|'y']) is "
                f"{_describe(target)}. Pass TruncatedLocalBPTT(target=lambda batch: <class indices [B]>)."
            )
        num_classes = self.partition.num_classes
        if target.numel() == 0:
            raise ValueError(f"batch {batch_idx} is empty: its target has shape {list(target.shape)}.")
        if target.dim() == 1:
            low, high = (int(v) for v in torch.stack([target.min(), target.max()]).tolist())
            if target.is_floating_point() or low < 0 or high >= num_classes:
                bad = high if high >= num_classes else low
                raise ValueError(
                    f"batch {batch_idx} has label {bad}, but the network has {num_classes} outputs, so labels must "
                    f"be class indices in [0, {num_classes}) (dtype {target.dtype}). Check the dataset's labels, "
                    "or the network's output width."
                )
        elif target.dim() != 2 or target.shape[1] != num_classes:
            raise ValueError(
                f"targets must be class indices [B] or per-class targets [B, {num_classes}], got shape "
                f"{list(target.shape)} in batch {batch_idx}. Pass target= to TruncatedLocalBPTT."
            )
        return target.to(self.root_device)

    def _note_spikes(self, key: str, spikes: Tensor) -> None:
        """Whether each output neuron (last axis) of ``spikes [..., C]`` fired in this chunk, kept on the device."""
        if self.silent_steps is not None:
            spiked = spikes.detach().ne(0).reshape(-1, spikes.shape[-1]).any(0)
            self._spiked[key] = spiked if key not in self._spiked else self._spiked[key] | spiked

    def _check_gradients(self, module: pl.LightningModule, chunk_index: int, batch_idx: int) -> None:
        """No non-finite value ever reaches the weights: one fused norm per chunk, details only on failure.

        The spike flags of the silent-network check are read in the same synchronisation.
        """
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        norm = torch.stack(torch._foreach_norm(grads)).float().sum() if grads else torch.zeros(())
        keys = list(self._spiked)
        flags = [self._spiked[k].float() for k in keys]
        values = torch.cat([norm.to(self.root_device).reshape(1), *flags]).tolist()
        self._spiked.clear()
        offset = 1
        for key, neurons_ in zip(keys, flags, strict=True):
            fired = values[offset : offset + len(neurons_)]
            offset += len(neurons_)
            counts = self._silent.get(key, [0] * len(fired))
            self._silent[key] = [0 if f else c + 1 for f, c in zip(fired, counts, strict=True)]
        self._silent_since_start += 1
        self._warn_if_silent(module)
        if torch.isfinite(torch.tensor(values[0])):
            return
        name = next(n for n, p in module.named_parameters() if p.grad is not None and not p.grad.isfinite().all())
        raise FloatingPointError(
            f"non-finite gradient of {name} ({self._block_of(module, name)}) at chunk {chunk_index} (time steps "
            f"from {chunk_index * self.k}) of batch {batch_idx}; the optimizer step was skipped, so the weights are "
            "still finite. Check the input for NaN/inf, lower the learning rate or enable gradient clipping "
            "(Trainer(gradient_clip_val=...))."
        )

    def _warn_if_silent(self, module: pl.LightningModule) -> None:
        """Once per readout: a neuron that never fires gets no surrogate gradient and can stay silent for good.

        Counted per output neuron, since one silent class (its accuracy 0) is the usual way such runs fail.
        """
        if self.silent_steps is None:
            return
        for key, counts in self._silent.items():
            if key in self._warned_silent:
                continue
            silent = [i for i, c in enumerate(counts) if c >= self.silent_steps]
            if not silent:
                continue
            self._warned_silent.add(key)
            who = key if len(silent) == len(counts) else f"output neuron(s) {silent} of {len(counts)} of {key}"
            steps = max(counts)
            if min(counts[i] for i in silent) >= self._silent_since_start:  # none of them ever fired
                why = (
                    "It has not fired since training started: at initialization its inputs hold its membrane "
                    "below the surrogate window, where no gradient passes, and a lower learning rate will not "
                    "revive it. Start it inside the window: raise the bias of the layer that feeds it (e.g. so "
                    "that its mean input holds the membrane at threshold on one batch, docs/results.md) or "
                    "lower its threshold."
                )
            else:
                why = (
                    "It fired before, so the updates pushed it out: the learning rate is usually too high, and "
                    f"every batch takes T/k optimizer steps (k={self.k}); lower it."
                )
            rank_zero_warn(
                f"{who} has not spiked for {steps} optimizer steps in a row (global step "
                f"{module.trainer.global_step}), so it passes no gradient back and its class may stay unlearnt. "
                f"{why} (TruncatedLocalBPTT(silent_steps=None) turns this check off.)"
            )

    def _block_of(self, module: pl.LightningModule, name: str) -> str:
        assert self.partition is not None
        if name.startswith(f"{CLASSIFIERS_ATTR}."):
            return f"local classifier of block {name.split('.')[1]}"
        param = module.get_parameter(name)
        for block in self.partition.blocks:
            if any(param is p for layer in block.layers for m in layer.modules for p in m.parameters()):
                return f"block {block.index}"
        return "outside the blocks"

    def _check_optimizers(self, module: pl.LightningModule) -> None:
        # A configure_optimizers written over one attribute (e.g. `self.net.parameters()`) leaves the local
        # classifiers out: give them a parameter group with the optimizer's defaults rather than not train them.
        optimizer = self.optimizers[0]
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        classifiers = getattr(module, CLASSIFIERS_ATTR)
        missing = [p for p in classifiers.parameters() if p.requires_grad and id(p) not in known]
        if missing:
            optimizer.add_param_group({"params": missing})
            for config in self.lr_scheduler_configs:
                if hasattr(config.scheduler, "base_lrs"):
                    config.scheduler.base_lrs.append(optimizer.param_groups[-1]["lr"])
            rank_zero_info("TruncatedLocalBPTT: added the local classifiers' parameters to the optimizer.")

    def _patch_scheduler_updates(self, trainer: pl.Trainer) -> None:
        """Let Lightning step the schedulers itself (intervals, frequencies, monitors, ``lr_scheduler_step``).

        Lightning skips scheduler updates under manual optimisation (and strips monitors from the configs made
        for it); the configs here were made the automatic way, and the update runs flagged automatic.
        """
        loop = trainer.fit_loop.epoch_loop
        update = type(loop)._update_learning_rates.__get__(loop)
        module = self.lightning_module
        assert module is not None

        def as_automatic(interval: str, update_plateau_schedulers: bool) -> None:
            module.automatic_optimization = True
            try:
                update(interval=interval, update_plateau_schedulers=update_plateau_schedulers)
            finally:
                module.automatic_optimization = False

        loop._update_learning_rates = as_automatic  # type: ignore[method-assign]
        self._patched_scheduler_update = as_automatic

    def _reduce_gradients(self, module: pl.LightningModule) -> None:
        """Average gradients over ranks in one collective (what the DDP wrapper would have done)."""
        if self.world_size == 1:
            return
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


class _CheckpointLocalClassifiers(Callback):
    """Saves the local classifiers and their settings under ``CHECKPOINT_KEY``, beside the module's state."""

    def __init__(self, strategy: TruncatedLocalBPTT) -> None:
        self.strategy = strategy

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        classifiers = getattr(pl_module, CLASSIFIERS_ATTR, None)
        if classifiers is not None:
            checkpoint[CHECKPOINT_KEY] = {
                "state_dict": classifiers.state_dict(),
                "settings": {name: getattr(self.strategy, name) for name in _SETTINGS},
            }


def strip_local_classifiers(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Remove what TruncatedLocalBPTT added to a checkpoint (for checkpoints written before 0.2, also from its
    ``state_dict``), so the module loads it strictly: ``torch.save(strip_local_classifiers(torch.load(p)), p)``."""
    checkpoint.pop(CHECKPOINT_KEY, None)
    prefix = f"{CLASSIFIERS_ATTR}."
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(prefix)}
    return checkpoint


def _detach_states(net: nn.Module) -> None:
    """``functional.detach_net``, out of place: a recurrent container's state can be a view, which ``detach_``
    refuses ("Can't detach views in-place")."""
    for m in net.modules():
        if isinstance(m, base.MemoryModule):
            for key, value in m._memories.items():
                if isinstance(value, Tensor):
                    m._memories[key] = value.detach()


def _plain_backward(loss: Tensor) -> None:
    loss.backward()


def _bind(fn: Callable[..., Any], *bound: Any) -> Callable[..., Any]:
    def hook(*args: Any) -> Any:
        return fn(*bound, *args)

    return hook


def _take_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any], Tensor]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return args, kwargs, value
    raise RuntimeError("a block boundary received no tensor")  # the probe chose this cut for its one tensor


def _put_tensor(args: tuple[Any, ...], kwargs: dict[str, Any], h: Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    for i, value in enumerate(args):
        if isinstance(value, Tensor):
            return (*args[:i], h, *args[i + 1 :]), kwargs
    key = next(key for key, value in kwargs.items() if isinstance(value, Tensor))
    return args, {**kwargs, key: h}


def _tensors(batch: Any) -> list[Tensor]:
    found: list[Tensor] = []
    apply_to_collection(batch, Tensor, found.append)
    return found


def _batch_size(batch: Any) -> int | None:
    tensors = _tensors(batch)
    return tensors[0].shape[0] if tensors and tensors[0].dim() else None


def _shape(t: Tensor | None) -> str:
    return "missing" if t is None else f"of shape {list(t.shape)}"


def _describe(value: Any) -> str:
    return f"a tensor of shape {list(value.shape)}" if isinstance(value, Tensor) else repr(value)[:80]


def _fingerprint(net: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(m)) for name, m in net.named_modules()]


StrategyRegistry.register(
    TruncatedLocalBPTT.strategy_name,
    TruncatedLocalBPTT,
    description="Temporally-truncated local BPTT (Guo et al. 2023) with k=5, n=2, trainable classifiers",
)

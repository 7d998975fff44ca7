"""The TruncatedLocalBPTT strategies: Lightning's glue around the chunk loop.

:class:`TruncatedLocalBPTT` runs on one device (Lightning's ``SingleDeviceStrategy``: no process group, not
distributed) and :class:`TruncatedLocalBPTTDDP` on several (Lightning's ``DDPStrategy``: one process per device,
gradients averaged over ranks before every optimizer step); both share :class:`_Algorithm`. The user's module stays
in automatic optimisation: Lightning runs its own optimisation once per chunk of ``k`` time steps
(:mod:`~lightning_tlbptt.chunks`), so every hook, callback, scheduler, precision plugin and step counter works as in
plain Lightning, with one optimizer step per chunk: ``global_step`` counts chunks, as with Lightning 1.x's
``truncated_bptt_steps``.

What the strategy adds, per job:

- :mod:`~lightning_tlbptt.probe`: at the first training batch, where to cut the network, and the local classifiers;
- :mod:`~lightning_tlbptt.chunks`, :mod:`~lightning_tlbptt.cuts`, :mod:`~lightning_tlbptt.states`,
  :mod:`~lightning_tlbptt.batch`: the chunk loop, the hooks in the network, neuron states per network call, the
  local losses' gradients;
- :mod:`~lightning_tlbptt.checkpointing`: the local classifiers in the optimizer and in checkpoints;
- :mod:`~lightning_tlbptt.measuring`: ``k='auto'``'s chunks measured on the device;
- :mod:`~lightning_tlbptt.checks`: the target, finite gradients, silent outputs;
- :mod:`~lightning_tlbptt._lightning`: the private Lightning API used, in one place.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning.pytorch.utilities.types import STEP_OUTPUT
from spikingjelly.activation_based import base
from torch import Tensor, nn
from typing_extensions import override

from lightning_tlbptt import _lightning, _twin, budget, checkpointing, measuring, neurons
from lightning_tlbptt.batch import batch_size
from lightning_tlbptt.checks import SilenceCheck, StepCost, check_gradients
from lightning_tlbptt.chunks import ChunkLoop, Split, StepEvery, split_along_time
from lightning_tlbptt.classifiers import ClassifierKind
from lightning_tlbptt.losses import LocalLoss, resolve_loss
from lightning_tlbptt.partitioning import _check_spiking as check_spiking
from lightning_tlbptt.partitioning import find_network
from lightning_tlbptt.probe import build, check_probe

__all__ = ["TimeSplit", "TruncatedLocalBPTT"]

TimeSplit = Literal["auto", "network", "batch"]


class _Algorithm:
    """Temporally-truncated local BPTT (Guo et al., 2023), shared by the single-device and the DDP strategy.

    Change one line of a Lightning project, ``Trainer(strategy=TruncatedLocalBPTT(k=5, n=2))``: the module's own
    ``training_step`` (its loss, its logged metrics) runs once per chunk of ``k`` time steps with an optimizer step
    after each, and the network is cut into gradient-isolated blocks of ``n`` layers, each block but the last
    trained by a local classifier. Validation, test and predict run the module unchanged.

    Args:
        k: time steps per truncation interval (chunk). When ``k`` does not divide ``T`` the last chunk is shorter.
            ``"auto"``: the largest ``k <= T`` that fits ``memory_budget`` (:mod:`~lightning_tlbptt.budget`), chosen
            at the first batch from two chunks measured on the device, then readable as ``strategy.k``.
        memory_budget: bytes (or ``"2GiB"``, ``"512MiB"``) the training may use, with ``k="auto"``.
        n: hidden layers per block; ``None`` (or ``n >=`` the number of hidden layers) gives one block (no local
            classifier). A layer is a weighted module (Conv/Linear) with what follows it, or a group that cannot be
            cut (a residual block).
        classifier: ``"trainable"`` local classifiers, or ``"random"`` (every parameter frozen, from ``seed``).
        loss: loss of the local classifiers: ``"mse"`` (the paper's Eq. 3, firing rate against one-hot),
            ``"ce"`` or a callable ``(out_seq [k, B, C], target) -> scalar``. The last block is trained by the loss
            your ``training_step`` returns.
        network: attribute name of the network in the LightningModule; by default the one child holding
            SpikingJelly neurons.
        time_split: ``"network"`` cuts the time axis at the network's entry (multi-step neurons), ``"batch"`` cuts
            the batch along ``time_dim`` (:meth:`split_batch`), ``"auto"`` picks ``"network"`` unless every neuron
            runs in ``step_mode='s'``.
        time_dim: the batch's time axis for ``time_split="batch"`` (1: ``[B, T, ...]``, tonic's layout).
        target: ``batch -> target`` for the local classifiers (class indices ``[B]`` or per-class targets
            ``[B, C]``); default: ``batch[1]``, or ``batch["target" | "label" | "labels" | "y"]``.
        classifier_pool: spatial size the local classifiers pool feature maps down to.
        seed: seed of the local classifiers' initial weights.
        fast_neurons: during ``fit``, run SpikingJelly neurons through the strategy's kernel
            (:mod:`~lightning_tlbptt.neurons`): the same spikes bit for bit, less memory, faster on CPU.
        silent_steps: warn once when an output neuron of the network (if it spikes) or of a local classifier has
            not spiked for this many optimizer steps in a row, or for the second half of an epoch; ``None``: off.
        pack_spikes: save the spikes layers keep for backward at one bit each
            (:func:`~lightning_tlbptt.packing.binary_saved_tensors`).
        slice_bytes: run the widest layer's forward over its chunk in time slices whose widest tensor is about
            this many bytes (:mod:`~lightning_tlbptt.slicing`); ``None`` runs every layer over the whole chunk.
        coarsen_slices: let narrower layers take longer slices than the finest, within the peak the widest sets.
        balance_readouts: start each local classifier inside its neuron's surrogate window: on its first training
            chunk its bias is set so that its mean input holds the membrane at threshold, and re-centred on the whole
            first batch's mean when the second starts (averaged over ranks, recorded in the checkpoint); an output
            that then spikes on no sample of a whole batch is moved back the same way
            (:class:`~lightning_tlbptt.classifiers.LocalClassifier`). ``False``: the default init, where a deep
            block's readout can start silent, and nothing brings back an output its block pushed out.
        retain_block_graphs: keep each block's graph after its local backward until the network call returns, so
            that a loss of yours on a tensor made inside a block (hidden spikes returned beside the output) also
            back-propagates into that block. Off by default: it keeps every block's activations of the chunk.
        step_every: ``"chunk"``: Algorithm 1, an optimizer step after every chunk (``global_step`` counts chunks).
            ``"batch"``: the chunks' gradients (their local losses' and the losses your ``training_step`` returns)
            are averaged and the optimizer steps once per batch, after its last chunk, as in plain Lightning
            (``global_step`` counts batches; zero_grad, the backward hooks and clipping once per batch). The same
            memory (gradients are held once); ``T / k - 1`` fewer optimizer steps, which on a large network cost
            more than the rest of the batch (docs/benchmarks.md). Not the paper's algorithm: docs/results.md gives
            its accuracy beside Algorithm 1's.
        **kwargs: passed to Lightning's ``SingleDeviceStrategy`` / ``DDPStrategy``.
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
        coarsen_slices: bool = True,
        balance_readouts: bool = True,
        retain_block_graphs: bool = False,
        step_every: StepEvery = "chunk",
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
        if step_every not in ("chunk", "batch"):
            raise ValueError(
                f"step_every must be 'chunk' (an optimizer step after every chunk, Algorithm 1) or 'batch' (one step "
                f"per batch on the chunks' mean gradient), got {step_every!r}"
            )
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
        self.coarsen_slices = coarsen_slices
        self.balance_readouts = balance_readouts
        self.retain_block_graphs = retain_block_graphs
        self.step_every: StepEvery = step_every
        self.partition = None
        self._net: nn.Module | None = None
        self._classifiers: nn.ModuleList | None = None
        self._split: Split = "network"
        self._loop: ChunkLoop | None = None
        self._budget_pending = False  # k='auto' chosen, its first batch not yet checked against the budget
        self._silence = SilenceCheck(silent_steps, k)
        self._step_cost = StepCost()
        self._user_groups = 1
        self._pending: dict[str, Any] | None = None  # a checkpoint's local classifiers, until they exist

    # --- Lightning's fit ------------------------------------------------------------------------------------------

    @property  # type: ignore[override]
    def accelerator(self) -> Any:
        return self._accelerator  # type: ignore[attr-defined]

    @accelerator.setter
    def accelerator(self, accelerator: Any) -> None:
        # the first thing a Trainer does with its strategy: a pytorch_lightning Trainer gets pytorch_lightning's twin
        twin = _twin.counterpart(type(self), accelerator) if accelerator is not None else None
        if twin is not None:
            self.__class__ = twin
        self._accelerator = accelerator

    @override
    def connect(self, model: pl.LightningModule) -> None:
        super().connect(model)  # type: ignore[misc]
        trainer = model._trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return
        accumulating = [c for c in trainer.callbacks if isinstance(c, GradientAccumulationScheduler)]
        if trainer.accumulate_grad_batches != 1 or accumulating:
            what = (
                f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches})"
                if trainer.accumulate_grad_batches != 1
                else "GradientAccumulationScheduler"
            )
            raise MisconfigurationException(
                f"TruncatedLocalBPTT steps the optimizer after every chunk of k={self.k} time steps (Algorithm 1), "
                f"so {what} cannot be honoured: the chunks of several batches would need one gradient buffer per "
                "chunk position. Remove it; to see more samples per step use a larger batch, or a larger k."
            )
        if not model.automatic_optimization:
            raise MisconfigurationException(
                f"{type(model).__name__} sets `automatic_optimization = False`: TruncatedLocalBPTT runs Lightning's "
                "automatic optimisation once per chunk. Remove that line and the manual backward/step calls from "
                "training_step; return the loss."
            )

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        module = self.lightning_module  # type: ignore[attr-defined]
        assert module is not None
        if trainer.state.fn != TrainerFn.FITTING:
            super().setup(trainer)  # type: ignore[misc]
            return
        if self._k_auto:
            self.k = "auto"  # chosen anew for every fit
        _, self._net = find_network(module, self.network)
        check_spiking(self._net)  # before configure_optimizers meets a network with nothing to train
        self._split = self._resolve_split(self._net)
        if self._split == "batch" and self._k_auto:
            raise MisconfigurationException(
                "k='auto' measures chunks cut where the network receives the time axis; with time_split='batch' "
                "(single-step networks) pass an int k."
            )
        self._loop, self._classifiers, self.partition, self._budget_pending = None, None, None, False
        self._step_cost = StepCost()
        self._silence = SilenceCheck(self.silent_steps, self.k if self.step_every == "chunk" else None, self.classifier)
        try:
            super().setup(trainer)  # type: ignore[misc]
        except RuntimeError as err:
            if "multiple optimizers" not in str(err):
                raise
            raise MisconfigurationException(
                "TruncatedLocalBPTT steps one optimizer per chunk; configure_optimizers returned several. Return a "
                "single optimizer (use parameter groups for different learning rates)."
            ) from err
        self._user_groups = len(self.optimizers[0].param_groups)  # type: ignore[attr-defined]
        _lightning.run_per_chunk(trainer, self._run_batch)

    @override
    def teardown(self) -> None:
        module = self.lightning_module  # type: ignore[attr-defined]
        if module is not None and module._trainer is not None:
            _lightning.restore_run(module._trainer)
        if module is not None:
            neurons.restore(module)
        if self._loop is not None:
            self._loop.close()
        self._loop = None
        super().teardown()  # type: ignore[misc]

    # --- one batch, chunk by chunk --------------------------------------------------------------------------------

    def _run_batch(self, run: _lightning.BatchRun, optimizer: Any, batch_idx: int, kwargs: dict[str, Any]) -> Any:
        module = self.lightning_module  # type: ignore[attr-defined]
        trainer = module.trainer
        if batch_size(kwargs["batch"]) == 0:
            raise ValueError(
                f"batch {batch_idx} is empty (its first tensor has 0 samples): nothing to train on. Check the dataset "
                "and the sampler, or drop empty batches (DataLoader(drop_last=True))."
            )
        self._step_cost.start_batch()
        if self._loop is None or self._budget_pending:
            loop = self.prepare(kwargs["batch"])
            self._budget_pending = False
            with measuring.checking_budget(self, loop):
                outputs = self._run_chunks(loop, run, optimizer, batch_idx, kwargs)
        else:
            outputs = self._run_chunks(self._loop, run, optimizer, batch_idx, kwargs)
        self._step_cost.end_batch(self.optimizers[0], self.k, self.step_every)  # type: ignore[attr-defined]
        if batch_idx + 1 == trainer.num_training_batches:
            self._silence.end_epoch(trainer.global_step)
        return outputs

    def _run_chunks(
        self, loop: ChunkLoop, run: _lightning.BatchRun, optimizer: Any, batch_idx: int, kwargs: dict[str, Any]
    ) -> Any:
        skip = _lightning.skips_backward(loop.module.trainer)
        return loop.run(
            lambda chunk_kwargs: run(optimizer, batch_idx, chunk_kwargs), batch_idx, kwargs, skip, self._hold_chunk
        )

    def _hold_chunk(self, kwargs: dict[str, Any]) -> STEP_OUTPUT:
        """``step_every="batch"``: one chunk's training step as Lightning's closure runs it, its loss's gradients held
        with the local losses' (no zero_grad, no optimizer)."""
        loop = self._loop
        assert loop is not None
        output = _lightning.call_training_step(self.lightning_module.trainer, kwargs)  # type: ignore[attr-defined]
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if isinstance(loss, Tensor) and loss.requires_grad:
            with self._explaining_freed_graphs():
                loop.gradients.backward(loss, retain_graph=False)
        return output

    def prepare(self, batch: Any) -> ChunkLoop:
        """Probe the network on this training batch (on the device) and build the local classifiers, once per fit.

        Done at the first training batch; callbacks that read :attr:`partition` or :attr:`local_classifiers` before
        it runs (at ``on_train_batch_start``) call it first."""
        if self._loop is None:
            self._loop = self._start(self.lightning_module, batch)  # type: ignore[attr-defined]
            self._budget_pending = self.memory_budget is not None
        return self._loop

    def _start(self, module: pl.LightningModule, batch: Any) -> ChunkLoop:
        """The first batch of a fit: probe the network, build the local classifiers, join them to the optimizer."""
        assert self._net is not None
        trainer = module.trainer
        device = self.root_device  # type: ignore[attr-defined]
        probed, classifiers, split_batch = build(
            module,
            self._net,
            batch,
            self.split_batch if self._split == "batch" else None,
            k=self.k,
            n=self.n,
            time_dim=self.time_dim,
            slice_bytes=self.slice_bytes,
            coarsen=self.coarsen_slices,
            kind=self.classifier,
            pool=self.classifier_pool,
            seed=self.seed,
            balance=self.balance_readouts,
            # on the device and in the precision the module trains in (64-true, bf16-true) before they are sized
            prepare=lambda c: self.precision_plugin.convert_module(c.to(device)),  # type: ignore[attr-defined]
            device=device,
        )
        self.partition, self._classifiers = probed.partition, classifiers
        check_probe(probed, self.k)
        if self.fast_neurons:
            neurons.accelerate(self._net)
            neurons.accelerate(classifiers)
        optimizer = self.optimizers[0]  # type: ignore[attr-defined]
        checkpointing.prefer_foreach(optimizer)
        checkpointing.join(
            classifiers,
            optimizer,
            [config.scheduler for config in self.lr_scheduler_configs],  # type: ignore[attr-defined]
            self._pending,
            self._settings(),
        )
        self._pending = None
        scaler = getattr(self.precision_plugin, "scaler", None)  # type: ignore[attr-defined]
        loop = ChunkLoop(
            module,
            self._net,
            probed,
            classifiers,
            k=self.k if isinstance(self.k, int) else 1,
            split=self._split,
            split_batch=split_batch,
            loss_fn=self.loss_fn,
            target=self.target,
            silence=self._silence,
            pack_spikes=self.pack_spikes,
            device=device,
            scale=scaler.scale if scaler is not None else None,
            retain_graphs=self.retain_block_graphs,
            step_every=self.step_every,
            # fast_dev_run runs its batches whole (it sets max_steps to the number of batches)
            stop=lambda: not trainer.fast_dev_run and 0 <= trainer.fit_loop.epoch_loop.max_steps <= trainer.global_step,
        )
        loop.streams.install()
        if self.k == "auto":
            self.k = measuring.choose_k(self, loop, batch)
            loop.k = self.k
        # the probe's copies of the network's input and its blocks' are needed no longer: a batch's worth of memory
        loop.probed = dataclasses.replace(probed, args=(), kwargs={}, block_inputs=[])
        self._silence.k = self.k if self.step_every == "chunk" else None
        if probed.T is not None and self.step_every == "chunk":
            _lightning.stretch_lr_finder(trainer, loop.chunks_in(probed.T))
        blocks = probed.partition.blocks
        rank_zero_info(
            f"{type(self).__name__}(k={self.k}, n={self.n}, classifier={self.classifier!r}): "
            f"{len(probed.partition.layers)} layers in {len(blocks)} block(s): "
            + " | ".join(",".join(b.names) for b in blocks)
        )
        return loop

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        loop = self._loop
        assert loop is not None and loop.state is not None
        if loop.state.replaying:  # step_every="batch": the last chunk ran already, its gradients are held
            return loop.state.replay
        batch = args[0] if args else kwargs["batch"]
        output = super().training_step(*args, **kwargs)  # type: ignore[misc]
        loop.after_step()
        self._agree_on_chunks(loop)
        module = self.lightning_module  # type: ignore[attr-defined]
        for i, value in enumerate(loop.state.losses):
            module.log(f"train/block{i}/loss", value, batch_size=batch_size(batch), sync_dist=self.world_size > 1)  # type: ignore[attr-defined]
        loop.state.losses = torch.zeros_like(loop.state.losses)
        return output

    @override
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        step = super().optimizer_step  # type: ignore[misc]
        if not self._step_cost.timing:
            return step(optimizer, closure, model, **kwargs)
        return self._step_cost.step(lambda timed: step(optimizer, timed, model, **kwargs), closure)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        # Strategy.backward, with the local gradients added after the step's zero_grad, gradients averaged over
        # ranks and checked before on_after_backward (DDP's wrapper averages inside backward, too)
        module = self.lightning_module  # type: ignore[attr-defined]
        loop = self._loop
        assert loop is not None
        state = loop.state
        assert state is not None
        loop.gradients.add_to_grad()
        self.pre_backward(closure_loss)  # type: ignore[attr-defined]
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)  # type: ignore[attr-defined]
        if not state.replaying:  # replayed, the loss's gradients were held and added above
            with self._explaining_freed_graphs():
                self.precision_plugin.backward(closure_loss, module, optimizer, *args, **kwargs)  # type: ignore[attr-defined]
        self.reduce_gradients(module)
        where = f"chunk {state.chunk} (time steps from {state.window[0]}) of batch {state.batch_idx}"
        optimizer_ = self.optimizers[0]  # type: ignore[attr-defined]
        check_gradients(
            module,
            optimizer_,
            self._classifiers,
            self.partition,
            self._silence,
            self.root_device,
            where,  # type: ignore[attr-defined]
        )
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)  # type: ignore[attr-defined]
        self.post_backward(closure_loss)  # type: ignore[attr-defined]
        return closure_loss

    @contextlib.contextmanager
    def _explaining_freed_graphs(self) -> Iterator[None]:
        try:
            yield
        except RuntimeError as err:
            if "backward through the graph a second time" not in str(err):
                raise
            raise RuntimeError(
                "the loss your training_step returned reads a tensor made inside a block before the last (e.g. "
                f"hidden spikes your network returns beside its output), whose graph the strategy freed at the block "
                f"boundary after its local loss (n={self.n}). Pass TruncatedLocalBPTT(retain_block_graphs=True) so "
                "that your loss back-propagates into that block too (it keeps the blocks' activations of a chunk), "
                "use .detach() on that tensor in the loss, or n=None. No weight has changed."
            ) from err

    def reduce_gradients(self, module: pl.LightningModule) -> None:
        """Average gradients over ranks (nothing on one device)."""

    def _agree_on_chunks(self, loop: ChunkLoop) -> None:
        """Every rank must run as many chunks as the others (nothing on one device)."""

    def split_batch(self, batch: Any, k: int) -> list[Any]:
        """Cut ``batch`` into chunks of ``k`` steps along ``time_dim`` (``time_split="batch"``).

        Every tensor whose ``time_dim`` has the length of the first tensor's is cut; the others (labels ``[B]``,
        one-hot targets) are passed whole to every chunk. If the LightningModule defines
        ``tbptt_split_batch(batch, split_size)`` (Lightning 1.x's hook), that is used instead.
        """
        module = self.lightning_module  # type: ignore[attr-defined]
        hook = getattr(module, "tbptt_split_batch", None)
        if callable(hook):
            return list(hook(batch, k))
        return split_along_time(batch, k, self.time_dim)

    @property
    def spiking_network(self) -> nn.Module | None:
        """The network being trained, once ``setup`` has found it."""
        return self._net

    @property
    def local_classifiers(self) -> nn.ModuleList | None:
        """The local classifiers of the last fit (one per block but the last), once its first batch has run."""
        return self._classifiers

    # --- checkpoints ----------------------------------------------------------------------------------------------

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if self._classifiers is not None:
            checkpoint = checkpointing.with_classifiers(
                checkpoint, self._classifiers, self._user_groups, self._settings()
            )
        super().save_checkpoint(checkpoint, filepath, storage_options)  # type: ignore[misc]

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        checkpoint, self._pending = checkpointing.take_classifiers(checkpoint)
        super().load_model_state_dict(checkpoint, strict=strict)  # type: ignore[misc]

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        # a checkpoint's optimizer state holds the user's groups only; restored mid-fit (the tuner puts its
        # starting point back), the local classifiers' group is set aside meanwhile
        optimizers = self.optimizers  # type: ignore[attr-defined]
        extra = optimizers[0].param_groups[self._user_groups :] if optimizers else []
        if extra:
            del optimizers[0].param_groups[self._user_groups :]
        try:
            super().load_optimizer_state_dict(checkpoint)  # type: ignore[misc]
        finally:
            if extra:
                optimizers[0].param_groups.extend(extra)

    def _settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in checkpointing.SETTINGS}

    # --- checks ---------------------------------------------------------------------------------------------------

    def _resolve_split(self, net: nn.Module) -> Split:
        if self.time_split != "auto":
            return self.time_split
        modes = {m.step_mode for m in net.modules() if isinstance(m, base.StepModule) and hasattr(m, "v_threshold")}
        return "batch" if modes == {"s"} else "network"


class TruncatedLocalBPTT(_Algorithm, SingleDeviceStrategy):
    __doc__ = _Algorithm.__doc__

    @property
    def parallel_devices(self) -> list[torch.device] | None:
        return None

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        # Lightning hands a strategy that has this attribute the devices the Trainer chose
        if devices and len(devices) > 1:
            raise MisconfigurationException(
                f"TruncatedLocalBPTT trains on one device, but the Trainer chose {len(devices)} ({devices}). For "
                "one process per device use TruncatedLocalBPTTDDP(...) with the same arguments (or "
                "Trainer(strategy='tlbptt_ddp')); for one device pass Trainer(devices=1)."
            )
        if devices:
            self._root_device = torch.device(devices[0])


StrategyRegistry.register(
    TruncatedLocalBPTT.strategy_name,
    TruncatedLocalBPTT,
    description="Temporally-truncated local BPTT (Guo et al. 2023) on one device, k=5, n=2",
)
_twin.register(TruncatedLocalBPTT)

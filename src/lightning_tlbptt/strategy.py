"""The TruncatedLocalBPTT strategy: Algorithm 1 of Guo et al. (2023) as a Lightning strategy."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning.pytorch.utilities.types import STEP_OUTPUT, LRSchedulerConfig
from spikingjelly.activation_based import functional
from torch import Tensor, nn
from typing_extensions import override

from lightning_tlbptt import neurons
from lightning_tlbptt.classifiers import ClassifierKind, LocalClassifier
from lightning_tlbptt.layout import BatchLayout, to_time_major
from lightning_tlbptt.losses import LocalLoss, resolve_loss
from lightning_tlbptt.partitioning import Block, Partition, PartitionError, find_network, partition

__all__ = ["TruncatedLocalBPTT"]

_CONV_INPUT_DIMS = ((nn.Conv1d, 3), (nn.Conv2d, 4), (nn.Conv3d, 5))

_MANUAL_BY_US = "_tlbptt_manual_optimization"
# Marks a module switched to manual optimisation by this strategy, so that it can be fitted with it again. The
# flag is not switched back after fit: `trainer.global_step` reads the manual loop's counter only while it is set.

CLASSIFIERS_ATTR = "local_classifiers"
"""Name under which the local classifiers are added to the LightningModule (and its checkpoints)."""


class TruncatedLocalBPTT(DDPStrategy):
    """Train a SpikingJelly network with temporally-truncated local BPTT (Guo et al., 2023).

    Every training batch ``[T, B, ...]`` is cut into chunks of ``k`` time steps. For each chunk, block
    after block: forward over the chunk, local loss, backward, and the block's graph is freed before the
    next block runs (so activation memory is about ``k`` x the largest block, below the paper's Eq. 10);
    then one optimizer step and the neuron states are detached (truncated BPTT). Blocks hold ``n``
    layers (see :func:`~lightning_tlbptt.partitioning.partition`) and are gradient-isolated: each block
    but the last is trained by its own :class:`~lightning_tlbptt.classifiers.LocalClassifier`, the last
    one by the network's output layer. ``k = T`` and ``n >= layers`` is exactly standard BPTT.

    Validation, test and predict run the user's module unchanged. The user's ``training_step`` is not
    called: the strategy owns the training step (through ``manual_backward`` and the
    ``LightningOptimizer``, so ``global_step``, hooks, precision plugins and loggers work). It logs
    ``train/loss`` (output layer), ``train/acc`` (output averaged over the whole ``T``) and
    ``train/block{i}/loss``.

    The strategy is a :class:`~lightning.pytorch.strategies.DDPStrategy`: with ``devices > 1`` it
    launches one process per device; gradients are averaged over ranks before every optimizer step.
    With one device no process group traffic happens.

    Args:
        k: time steps per truncation interval (chunk). When ``k`` does not divide ``T`` the last chunk
            is shorter (``T mod k`` steps) and its loss averages over those steps only.
        n: hidden layers per block; ``n >= number of hidden layers`` gives one block (no local loss).
        classifier: ``"trainable"`` local classifiers, or ``"random"`` (frozen, from ``seed``).
        loss: ``"mse"`` (Eq. 3, firing rate against one-hot), ``"ce"`` or a callable
            ``(out_seq [k, B, C], target) -> scalar``, used for every block. Defaults to the module's
            ``loss_fn`` attribute if it has one (as :class:`SpikingClassifier` does), else ``"mse"``.
        network: attribute name of the network in the LightningModule; by default the one child
            holding SpikingJelly neurons.
        batch_layout: ``"BT"`` (``[B, T, ...]``, tonic's layout) or ``"TB"``. Defaults to the module's
            ``batch_layout`` attribute if it has one, else ``"BT"``.
        T: repeat static inputs ``[B, ...]`` over ``T`` steps (direct encoding). Defaults to the module's
            ``T`` attribute if it has one.
        unpack_batch: ``batch -> (x, target)``; default: ``batch[0], batch[1]``.
        classifier_pool: spatial size the local classifiers pool feature maps down to.
        seed: seed of the local classifiers' initial weights.
        fast_neurons: during ``fit``, run SpikingJelly ``LIFNode`` neurons with the rectangular surrogate (the paper's
            neuron) through :class:`~lightning_tlbptt.neurons.RectLIFFunction`: the same spikes bit for bit and
            the same gradients up to float rounding, one byte saved per neuron-step instead of four, and 1.6-2.9x
            faster on CPU than SpikingJelly's reference loop (``benchmarks/neuron_kernel.py``). Other neurons
            are left as they are, and the network is handed back unchanged after ``fit``.
        **kwargs: passed to :class:`~lightning.pytorch.strategies.DDPStrategy` (``start_method``,
            ``process_group_backend``, ``timeout``, ...).
    """

    strategy_name = "tlbptt"

    def __init__(
        self,
        k: int = 5,
        n: int = 2,
        *,
        classifier: ClassifierKind = "trainable",
        loss: Literal["mse", "ce"] | LocalLoss | None = None,
        network: str | None = None,
        batch_layout: BatchLayout | None = None,
        T: int | None = None,
        unpack_batch: Callable[[Any], tuple[Tensor, Tensor]] | None = None,
        classifier_pool: int = 4,
        seed: int = 0,
        fast_neurons: bool = True,
        **kwargs: Any,
    ) -> None:
        for name, value in (("k", k), ("n", n)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if classifier not in ("trainable", "random"):
            raise ValueError(f"classifier must be 'trainable' or 'random', got {classifier!r}")
        if batch_layout not in (None, "BT", "TB"):
            raise ValueError(f"batch_layout must be 'BT' ([B, T, ...]) or 'TB' ([T, B, ...]), got {batch_layout!r}")
        if T is not None and (not isinstance(T, int) or isinstance(T, bool) or T < 1):
            raise ValueError(f"T must be a positive int, got {T!r}")
        super().__init__(**kwargs)
        self.k = k
        self.n = n
        self.classifier = classifier
        self.loss_fn: LocalLoss | None = None if loss is None else resolve_loss(loss)
        self.network = network
        self.batch_layout = batch_layout
        self.T = T
        self.unpack_batch = unpack_batch
        self.classifier_pool = classifier_pool
        self.seed = seed
        self.fast_neurons = fast_neurons
        self.partition: Partition | None = None
        self._net: nn.Module | None = None
        self._clip: tuple[float, str] | None = None
        self._checked_first_batch = False

    @override
    def _configure_launcher(self) -> None:
        # One process needs no launcher, and Lightning's would call torch.set_num_threads(<cpu count>) unless
        # OMP_NUM_THREADS is set: the user's thread count would change, as under no single-device strategy.
        if self.num_nodes * self.num_processes > 1:
            super()._configure_launcher()

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
        if not model.automatic_optimization and not getattr(model, _MANUAL_BY_US, False):
            raise MisconfigurationException(
                f"{type(model).__name__} sets `automatic_optimization = False`: TruncatedLocalBPTT owns the "
                "training step and its optimizer steps. Remove that line; your training_step is not used."
            )

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        module = self.lightning_module
        assert module is not None
        if trainer.state.fn != TrainerFn.FITTING:
            super().setup(trainer)
            return
        if self.world_size == 1:
            # Lightning injects a shuffling DistributedSampler for any DDP strategy; on one device the
            # user's own DataLoader (and its order) must be used as with a single-device strategy.
            trainer._accelerator_connector.use_distributed_sampler = False
        name, self._net = find_network(module, self.network, exclude=(CLASSIFIERS_ATTR,))
        self.partition = partition(self._net, self.n)
        self._check_module_agrees(module)
        if self.loss_fn is None:
            self.loss_fn = resolve_loss(getattr(module, "loss_fn", None) or "mse")
        if not hasattr(module, CLASSIFIERS_ATTR):
            module.add_module(CLASSIFIERS_ATTR, self._make_classifiers())
        if self.fast_neurons:
            # after the classifiers are made: they copy the network's neurons, and must not copy the kernel
            neurons.accelerate(self._net)
            neurons.accelerate(getattr(module, CLASSIFIERS_ATTR))
        if trainer.gradient_clip_val:
            if isinstance(trainer.precision_plugin, MixedPrecision) and trainer.precision_plugin.scaler is not None:
                raise MisconfigurationException(
                    "Gradient clipping with precision='16-mixed' is not supported by TruncatedLocalBPTT (the "
                    "grad scaler unscales inside the optimizer step). Use precision='bf16-mixed' or '32-true', "
                    "or remove gradient_clip_val."
                )
            self._clip = (float(trainer.gradient_clip_val), str(trainer.gradient_clip_algorithm or "norm"))
        # Manual optimisation from here on: Lightning then runs no backward or step of its own. Setting the
        # flag after the configuration validator ran lets gradient clipping through; we honour it below.
        module.automatic_optimization = False
        setattr(module, _MANUAL_BY_US, True)
        super().setup(trainer)
        self._check_optimizers(module)
        blocks = self.partition.blocks
        rank_zero_info(
            f"TruncatedLocalBPTT(k={self.k}, n={self.n}, classifier={self.classifier!r}) replaces "
            f"{type(module).__name__}.training_step; network {name!r}: {len(self.partition.layers)} layers "
            f"in {len(blocks)} block(s): " + " | ".join(",".join(b.names) for b in blocks)
        )

    @override
    def teardown(self) -> None:
        # The kernel is this strategy's, not the user's network's: hand the network back as it came.
        if self.lightning_module is not None:
            neurons.restore(self.lightning_module)
        super().teardown()

    @override
    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        # Training batches stay in host memory and `training_step` moves one chunk of k steps at a time: the
        # device then holds k/T of the input, so device memory stays flat in T (an event batch [B, T, ...] can
        # outweigh a chunk's activations). The module's transfer hooks still run, with the host as the device.
        module = self.lightning_module
        if (
            module is not None
            and module._trainer is not None
            and module._trainer.training
            and self.partition is not None
        ):
            device = torch.device("cpu")
        return super().batch_to_device(batch, device, dataloader_idx)

    @override
    def configure_ddp(self) -> None:
        # No DistributedDataParallel wrapper: its reducer expects one backward per forward, while each
        # chunk runs one backward per block. Gradients are averaged once per optimizer step instead, and
        # the network starts from rank 0's weights as under DDP (local classifiers start from `seed`).
        if self.world_size > 1:
            from lightning.pytorch.overrides.distributed import _sync_module_states

            _sync_module_states(self._net)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        module = self.lightning_module
        assert module is not None and self.partition is not None and self._net is not None
        x, target = self.time_major_batch(args[0] if args else kwargs["batch"])
        if not self._checked_first_batch:
            self._check_first_batch(x, target)
        device = self.root_device
        target = target.to(device)
        optimizer = module.optimizers()
        assert not isinstance(optimizer, list)
        self._step_epoch_schedulers(module)

        classifiers: nn.ModuleList = getattr(module, CLASSIFIERS_ATTR)
        functional.reset_net(self._net)
        functional.reset_net(classifiers)
        blocks = self.partition.blocks
        loss_fn = self.loss_fn
        assert loss_fn is not None
        block_losses = torch.zeros(len(blocks), device=device)
        out_sum: Tensor | None = None
        n_chunks = 0
        for chunk_index, start in enumerate(range(0, x.shape[0], self.k)):
            h = x[start : start + self.k].to(device, non_blocking=True)
            losses = []
            for block in blocks:
                with self.precision_plugin.train_step_context():
                    out = self._run_block(block, h)
                    readout = out if block.is_last else classifiers[block.index](out)
                    if readout.dim() == 2:  # the network averages over time itself
                        readout = readout.unsqueeze(0)
                    loss = loss_fn(readout, target)
                module.manual_backward(loss)
                losses.append(loss.detach())
                h = out.detach()
            chunk_losses = torch.stack(losses)
            self._check_finite(chunk_losses, chunk_index)
            block_losses += chunk_losses
            rates = readout.detach().sum(0)
            out_sum = rates if out_sum is None else out_sum + rates
            n_chunks += 1
            self._reduce_gradients(module)
            if self._clip is not None:
                module.clip_gradients(optimizer, gradient_clip_val=self._clip[0], gradient_clip_algorithm=self._clip[1])
            optimizer.step()
            optimizer.zero_grad()
            self._step_interval_schedulers(module)
            functional.detach_net(self._net)
            functional.detach_net(classifiers)
        # free the last chunk's states now rather than when the next batch starts
        functional.reset_net(self._net)
        functional.reset_net(classifiers)

        block_losses /= n_chunks
        assert out_sum is not None
        self._log(module, block_losses, out_sum, target)
        return block_losses[-1]

    @property
    def spiking_network(self) -> nn.Module | None:
        """The network being trained, once ``setup`` has found it."""
        return self._net

    def time_major_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(x, target)`` of ``batch`` the way the strategy reads it, ``x`` as ``[T, B, ...]``."""
        module = self.lightning_module
        assert module is not None
        x, target = self.unpack_batch(batch) if self.unpack_batch else (batch[0], batch[1])
        return to_time_major(x, self._layout(module), self._steps(module)), target

    def _run_block(self, block: Block, h: Tensor) -> Tensor:
        if self.partition is not None and self.partition.step_mode == "s":
            return functional.multi_step_forward(h, block.module)
        return block.module(h)

    def _log(self, module: pl.LightningModule, block_losses: Tensor, out_sum: Tensor, target: Tensor) -> None:
        batch_size = out_sum.shape[0]
        sync = self.world_size > 1
        labels = target if target.dim() == 1 else target.argmax(-1)
        acc = (out_sum.argmax(-1) == labels).float().mean()
        module.log("train/loss", block_losses[-1], prog_bar=True, batch_size=batch_size, sync_dist=sync)
        module.log("train/acc", acc, prog_bar=True, batch_size=batch_size, sync_dist=sync)
        if len(block_losses) > 1:
            for i, value in enumerate(block_losses):
                module.log(f"train/block{i}/loss", value, batch_size=batch_size, sync_dist=sync)

    def _layout(self, module: pl.LightningModule) -> BatchLayout:
        return self.batch_layout or getattr(module, "batch_layout", None) or "BT"

    def _steps(self, module: pl.LightningModule) -> int | None:
        return self.T if self.T is not None else getattr(module, "T", None)

    def _make_classifiers(self) -> nn.ModuleList:
        assert self.partition is not None
        return nn.ModuleList(
            LocalClassifier(
                self.partition.num_classes,
                self.partition.neuron_template,
                kind=self.classifier,
                pool=self.classifier_pool,
                seed=self.seed + block.index,
            )
            for block in self.partition.blocks[:-1]
        )

    def _check_module_agrees(self, module: pl.LightningModule) -> None:
        assert self.partition is not None
        declared = getattr(module, "num_classes", None)
        if isinstance(declared, int) and declared != self.partition.num_classes:
            raise PartitionError(
                f"{type(module).__name__}.num_classes is {declared} but the network's output layer "
                f"({self.partition.layers[-1].names[0]}) has {self.partition.num_classes} outputs."
            )

    def _check_optimizers(self, module: pl.LightningModule) -> None:
        if len(self.optimizers) != 1:
            raise MisconfigurationException(
                f"TruncatedLocalBPTT steps one optimizer per chunk; configure_optimizers returned "
                f"{len(self.optimizers)}. Return a single optimizer (use parameter groups for different "
                "learning rates)."
            )
        if any(config.interval not in ("step", "epoch") for config in self.lr_scheduler_configs):
            raise MisconfigurationException("lr scheduler `interval` must be 'step' or 'epoch'")
        # A configure_optimizers written before local classifiers existed (e.g. over `self.net`) leaves them
        # out: give them a parameter group with the optimizer's defaults rather than silently not train them.
        optimizer = self.optimizers[0]
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        classifiers = getattr(module, CLASSIFIERS_ATTR)
        missing = [p for p in classifiers.parameters() if p.requires_grad and id(p) not in known]
        if missing:
            optimizer.add_param_group({"params": missing})
            rank_zero_info("TruncatedLocalBPTT: added the local classifiers' parameters to the optimizer.")

    def _check_first_batch(self, x: Tensor, target: Tensor) -> None:
        """Catch data that cannot fit before any optimizer step, with a message on how to fix it."""
        assert self.partition is not None and self._net is not None
        module = self.lightning_module
        first = self.partition.layers[0].weighted[0]
        needs = next((dims for cls, dims in _CONV_INPUT_DIMS if isinstance(first, cls)), None)
        if needs is not None and x.dim() != needs + 1:
            raise ValueError(
                f"the network's first layer ({type(first).__name__}) takes [T, B, C, ...] with {needs + 1} "
                f"dims, but the batch, read with batch_layout={self._layout(module)!r} and "
                f"T={self._steps(module)}, becomes {list(x.shape)}: it has no time axis or one too many. If "
                "these are static inputs (images [B, C, H, W]), pass T=<time steps> to TruncatedLocalBPTT "
                "(direct encoding); if they are sequences, yield [B, T, ...] (batch_layout='BT') or "
                "[T, B, ...] (batch_layout='TB')."
            )
        steps = x.shape[0]
        if self.k > steps:
            raise ValueError(
                f"k={self.k} is larger than the number of time steps T={steps} of the batch (shape "
                f"{list(x.shape)} as [T, B, ...]); choose k <= {steps}, or check batch_layout "
                f"({self._layout(module)!r})."
            )
        if target.shape[0] != x.shape[1]:
            raise ValueError(
                f"the target has {target.shape[0]} rows but the batch has {x.shape[1]} samples (x as "
                f"[T, B, ...]: {list(x.shape)}); check batch_layout={self._layout(module)!r} and unpack_batch."
            )
        num_classes = self.partition.num_classes
        if target.dim() == 1:
            if target.is_floating_point() or int(target.min()) < 0 or int(target.max()) >= num_classes:
                raise ValueError(
                    f"labels must be class indices in [0, {num_classes}) to match the network's output layer "
                    f"({num_classes} outputs), got dtype {target.dtype}, range [{target.min().item()}, "
                    f"{target.max().item()}]."
                )
        elif target.dim() != 2 or target.shape[1] != num_classes:
            raise ValueError(
                f"targets must be class indices [B] or per-class targets [B, {num_classes}], got shape "
                f"{list(target.shape)}."
            )
        # One step of one sample through every block and classifier: builds the lazy classifiers (their
        # input width is known only now) and reports a shape that does not fit, naming the block.
        classifiers = getattr(self.lightning_module, CLASSIFIERS_ATTR)
        h = x[:1, :1].to(self.root_device)
        # eval mode: batch norm must neither fail on one value per channel nor update its running stats
        modes = [(m, m.training) for m in (*self._net.modules(), *classifiers.modules())]
        self._net.eval()
        classifiers.eval()
        with torch.no_grad():
            for block in self.partition.blocks:
                try:
                    out = self._run_block(block, h)
                    if not block.is_last:
                        classifiers[block.index](out)
                except RuntimeError as err:
                    raise ValueError(
                        f"block {block.index} ({', '.join(block.names)}) failed on input of shape {list(h.shape)} "
                        f"(one step of one sample): {err}"
                    ) from err
                h = out
        for m, training in modes:
            m.train(training)
        functional.reset_net(self._net)
        functional.reset_net(classifiers)
        self._checked_first_batch = True

    @staticmethod
    def _check_finite(losses: Tensor, chunk_index: int) -> None:
        finite = torch.isfinite(losses)
        if not bool(finite.all()):
            block = int((~finite).nonzero()[0])
            raise FloatingPointError(
                f"non-finite loss {losses[block].item()} in block {block} at chunk {chunk_index} (time steps "
                f"from {chunk_index} * k); the optimizer step was skipped. Lower the learning rate, enable "
                "gradient clipping (Trainer(gradient_clip_val=...)) or check the input for NaN/inf."
            )

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

    def _step_interval_schedulers(self, module: pl.LightningModule) -> None:
        """Step ``interval='step'`` schedulers after an optimizer step, every ``frequency`` steps."""
        step = module.trainer.global_step
        for config in self.lr_scheduler_configs:
            if config.interval == "step" and step % config.frequency == 0:
                self._step_scheduler(config, module)

    def _step_epoch_schedulers(self, module: pl.LightningModule) -> None:
        """Step ``interval='epoch'`` schedulers for every finished epoch, before the next optimizer step.

        Lightning steps them at the end of an epoch; stepping before the first optimizer step of the
        next one is equivalent for the learning rate used, lets ``ReduceLROnPlateau`` see the validation
        metric of the epoch just finished, and is derived from the scheduler's own step count, so a
        resumed run steps exactly as an uninterrupted one.
        """
        epoch = module.trainer.current_epoch
        for config in self.lr_scheduler_configs:
            if config.interval == "epoch":
                while config.scheduler.last_epoch < epoch // config.frequency:
                    self._step_scheduler(config, module)

    @staticmethod
    def _step_scheduler(config: LRSchedulerConfig, module: pl.LightningModule) -> None:
        if not config.reduce_on_plateau:
            with warnings.catch_warnings():
                # a resumed run steps its epoch schedulers before the restored optimizer's first step; torch
                # warns about that order although the optimizer did step before the checkpoint was taken
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                config.scheduler.step()
            return
        value = module.trainer.callback_metrics.get(config.monitor) if config.monitor else None
        if value is None:
            if config.strict:
                available = ", ".join(sorted(module.trainer.callback_metrics)) or "none yet"
                raise MisconfigurationException(
                    f"ReduceLROnPlateau monitors {config.monitor!r}, which has not been logged (logged: "
                    f"{available}). Log it, or set `strict: False` in the scheduler config."
                )
            return
        config.scheduler.step(value)  # type: ignore[call-arg]


StrategyRegistry.register(
    TruncatedLocalBPTT.strategy_name,
    TruncatedLocalBPTT,
    description="Temporally-truncated local BPTT (Guo et al. 2023) with k=5, n=2, trainable classifiers",
)

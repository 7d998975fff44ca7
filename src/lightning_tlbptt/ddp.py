"""TruncatedLocalBPTTDDP: the strategy with one process per device, Lightning's ``DDPStrategy`` shape.

The algorithm is :class:`~lightning_tlbptt.strategy.TruncatedLocalBPTT`'s (:mod:`~lightning_tlbptt.strategy`); what
several processes add: the network starts from rank 0's weights, gradients (the network's and the local
classifiers') are averaged over ranks in one collective before every optimizer step, and every rank must run as many
chunks per batch as the others. There is no ``DistributedDataParallel`` wrapper: its reducer expects one backward per
forward, where a chunk runs one per block.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch import nn
from typing_extensions import override

from lightning_tlbptt import _lightning, _twin
from lightning_tlbptt.batch import average_over_ranks
from lightning_tlbptt.chunks import ChunkLoop
from lightning_tlbptt.strategy import TruncatedLocalBPTT, _Algorithm

__all__ = ["TruncatedLocalBPTT", "TruncatedLocalBPTTDDP"]


class TruncatedLocalBPTTDDP(_Algorithm, DDPStrategy):
    __doc__ = (_Algorithm.__doc__ or "") + (
        "\n    One process per device, as ``DDPStrategy``: gradients (the network's and the local classifiers') are "
        "averaged over ranks in one collective before every optimizer step; there is no DistributedDataParallel "
        "wrapper, whose reducer expects one backward per forward where a chunk runs one per block.\n"
    )

    strategy_name = "tlbptt_ddp"

    @override
    def configure_ddp(self) -> None:
        assert self.lightning_module is not None
        _lightning.sync_module_states(self.lightning_module)

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        return model  # never a DistributedDataParallel wrapper (see configure_ddp)

    @override
    def reduce_gradients(self, module: pl.LightningModule) -> None:
        average_over_ranks(
            [p.grad for group in self.optimizers[0].param_groups for p in group["params"] if p.grad is not None]
        )

    @override
    def _agree_on_chunks(self, loop: ChunkLoop) -> None:
        """One small all-reduce per batch; on disagreement every rank raises the same error at once instead of
        waiting in the next gradient all-reduce until the process group times out."""
        state = loop.state
        assert state is not None
        if state.window[0] != 0:
            return
        chunks = loop.chunks_in(state.seen_T or 0) if loop.split == "network" else int(state.seen_T or 0)
        counts = torch.tensor([chunks, -chunks], device=self.root_device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        most, fewest = int(counts[0]), -int(counts[1])
        if most != fewest:
            raise ValueError(
                f"ranks disagree on the number of chunks of batch {state.batch_idx}: between {fewest} and {most} "
                f"chunks of k={self.k} steps (this rank: {chunks}), so their optimizer steps and gradient all-reduces "
                "cannot pair up. Give every rank batches of the same length T (pad, or bucket sequences by length "
                "across ranks), or train on one device."
            )


StrategyRegistry.register(
    TruncatedLocalBPTTDDP.strategy_name,
    TruncatedLocalBPTTDDP,
    description="Temporally-truncated local BPTT (Guo et al. 2023), one process per device, k=5, n=2",
)
_twin.register(TruncatedLocalBPTTDDP)

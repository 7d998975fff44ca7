"""Neuron states per network-call stream (``states.py``): carried across chunks, one set alive at a time."""

from __future__ import annotations

import weakref

import torch
from spikingjelly.activation_based import neuron

from lightning_tlbptt.states import StateStreams


def test_a_chunk_holds_one_set_of_states_not_two() -> None:
    """The previous chunk's state is freed as soon as the layer replaces it (the paper's AlexNet peaked 3.3 MiB
    higher while a chunk's marks kept the replaced states alive)."""
    node = neuron.LIFNode(step_mode="m")
    streams = StateStreams([node])
    streams.install()
    streams.start_batch()
    streams.start_chunk()
    node(torch.rand(2, 3, 4) * 3)
    streams.end_chunk()

    streams.start_chunk()  # continues the first chunk's state
    carried = node.v
    assert isinstance(carried, torch.Tensor) and carried.abs().sum() > 0
    freed = weakref.ref(carried)
    del carried
    node(torch.rand(2, 3, 4) * 3)  # replaces it
    assert freed() is None
    streams.end_chunk()
    assert streams.streams == 1  # the call is still seen: its state is the next chunk's start
    streams.end_batch()
    streams.uninstall()

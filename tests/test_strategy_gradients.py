"""The anchor of correctness: gradients equal to independent references."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional, neuron, surrogate
from spikingjelly.activation_based.model import sew_resnet
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tlbptt import LocalClassifier, SavedTensorsMeter, SpikingClassifier, TruncatedLocalBPTT

from snn_fixtures import GradRecorder, conv_net, event_batches, wide_net


def _assert_all_nonzero(grads: dict[str, torch.Tensor]) -> None:
    # equal gradients prove nothing if they are all zero (a network that never spikes)
    for name, g in grads.items():
        assert g.abs().sum() > 0, f"gradient of {name} is zero: the test network does not spike enough"


def test_k_equal_T_one_block_equals_spikingjelly_bptt(make_trainer):
    loader = event_batches(n=8, T=6, batch_size=8)
    reference = conv_net()
    module = SpikingClassifier(conv_net(), lr=0.1, lr_step_epochs=0)
    recorder = GradRecorder()
    make_trainer(strategy=TruncatedLocalBPTT(k=6, n=99), max_steps=1, callbacks=[recorder]).fit(module, loader)

    x, y = next(iter(loader))
    functional.reset_net(reference)
    out = reference(x.transpose(0, 1))
    F.mse_loss(out.mean(0), F.one_hot(y, 4).float()).backward()
    got = recorder.steps[0]
    assert set(got) == {f"net.{name}" for name, _ in reference.named_parameters()}
    _assert_all_nonzero(got)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(got[f"net.{name}"], p.grad, atol=1e-6, rtol=0)


def _sew_resnet() -> nn.Module:
    torch.manual_seed(0)
    net = sew_resnet.sew_resnet18(
        cnf="ADD", num_classes=5, spiking_neuron=neuron.IFNode, surrogate_function=surrogate.ATan(), detach_reset=True
    )
    functional.set_step_mode(net, "m")
    return net


def test_k_equal_T_one_block_equals_bptt_on_sew_resnet(make_trainer):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 3, 16, 16, generator=g)  # [B, T, C, H, W]
    y = torch.tensor([1, 3])
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    reference = _sew_resnet()
    module = SpikingClassifier(_sew_resnet(), loss="ce", lr=0.1, lr_step_epochs=0)
    recorder = GradRecorder()
    make_trainer(strategy=TruncatedLocalBPTT(k=3, n=100, loss="ce"), max_steps=1, callbacks=[recorder]).fit(
        module, loader
    )

    functional.reset_net(reference)
    F.cross_entropy(reference(x.transpose(0, 1)).mean(0), y).backward()
    got = recorder.steps[0]
    assert got.keys() == {f"net.{name}" for name, p in reference.named_parameters() if p.grad is not None}
    for name, p in reference.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[f"net.{name}"], p.grad, atol=1e-6, rtol=1e-5)


def _reference_tlbptt(
    net: nn.Sequential, parts: list[slice], classifiers: list[nn.Module], loader, k: int, step_every: str = "chunk"
) -> None:
    """Written from Algorithm 1 directly: per chunk, run every block (detached from the one before), sum
    the local losses, one backward, one SGD step, detach the states. ``step_every="batch"``: the chunks' backwards
    add up and the step comes once, after the batch's last chunk, on their mean."""
    params = [p for p in net.parameters()] + [p for c in classifiers for p in c.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for x, y in loader:
        x_seq = x.transpose(0, 1)
        functional.reset_net(net)
        for c in classifiers:
            functional.reset_net(c)
        for start in range(0, x_seq.shape[0], k):
            h = x_seq[start : start + k]
            total = 0.0
            for i, part in enumerate(parts):
                out = net[part](h.detach())
                readout = out if i == len(parts) - 1 else classifiers[i](out)
                total = total + F.mse_loss(readout.mean(0), F.one_hot(y, 4).float())
                h = out
            total.backward()
            if step_every == "chunk":
                opt.step()
                opt.zero_grad()
            functional.detach_net(net)
            for c in classifiers:
                functional.detach_net(c)
        if step_every == "batch":
            for p in params:
                p.grad /= math.ceil(x_seq.shape[0] / k)
            opt.step()
            opt.zero_grad()


N1 = [slice(0, 3), slice(3, 6), slice(6, 10)]


@pytest.mark.parametrize(
    ("k", "n", "parts", "balance", "step_every"),
    [
        (3, 99, [slice(0, 10)], True, "chunk"),
        (2, 1, N1, True, "chunk"),
        (2, 1, N1, False, "chunk"),
        (3, 99, [slice(0, 10)], True, "batch"),
        (2, 1, N1, True, "batch"),
    ],
)
def test_k_below_T_equals_chunkwise_reference(make_trainer, k, n, parts, balance, step_every):
    loader = event_batches(n=16, T=8, batch_size=8)
    reference = conv_net()
    classifiers = [
        LocalClassifier(4, copy.deepcopy(reference[1]), seed=i, balance=balance) for i in range(len(parts) - 1)
    ]
    module = SpikingClassifier(conv_net(), lr=0.1, momentum=0.9, lr_step_epochs=0)
    strategy = TruncatedLocalBPTT(k=k, n=n, balance_readouts=balance, step_every=step_every)
    trainer = make_trainer(strategy=strategy)
    trainer.fit(module, loader)
    _reference_tlbptt(reference, parts, classifiers, loader, k, step_every)

    # two batches, a shorter last chunk when k ∤ T
    assert trainer.global_step == 2 * (math.ceil(8 / k) if step_every == "chunk" else 1)
    for (name, p), q in zip(module.net.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5, msg=f"parameter {name} differs")
    for mine, theirs in zip(trainer.strategy.local_classifiers, classifiers, strict=True):
        torch.testing.assert_close(mine.linear.weight, theirs.linear.weight, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.linear.bias, theirs.linear.bias, atol=1e-5, rtol=1e-5)


def test_n1_block_gradients_come_from_their_own_local_loss_only(make_trainer):
    loader = event_batches(n=8, T=4, batch_size=8)
    module = SpikingClassifier(conv_net(), lr=0.1, lr_step_epochs=0)
    recorder = GradRecorder()
    make_trainer(strategy=TruncatedLocalBPTT(k=4, n=1), max_steps=1, callbacks=[recorder]).fit(module, loader)
    got = recorder.steps[0]

    # One forward without any detach: every later loss *could* reach earlier blocks' weights here.
    net = conv_net()
    classifiers = [LocalClassifier(4, copy.deepcopy(net[1]), seed=i) for i in range(2)]
    x, y = next(iter(loader))
    functional.reset_net(net)
    h = x.transpose(0, 1)
    parts, losses = [slice(0, 3), slice(3, 6), slice(6, 10)], []
    for i, part in enumerate(parts):
        h = net[part](h)
        readout = h if i == 2 else classifiers[i](h)
        losses.append(F.mse_loss(readout.mean(0), F.one_hot(y, 4).float()))
    for i, part in enumerate(parts):
        names = [f"{j}.{name}" for j in range(len(net))[part] for name, _ in net[j].named_parameters()]
        params = [net.get_parameter(name) for name in names]
        own = torch.autograd.grad(losses[i], params, retain_graph=True)
        for name, g in zip(names, own, strict=True):
            assert g.abs().sum() > 0
            torch.testing.assert_close(got[f"net.{name}"], g, atol=1e-6, rtol=0)
        later = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses[i + 1 :]]
        # the reference graph does connect later losses to this block: leakage would have been visible
        assert all(any(g is not None and g.abs().sum() > 0 for g in grads) for grads in later)


def test_random_classifiers_stay_fixed_and_trainable_ones_learn(make_trainer):
    for kind, should_change in (("random", False), ("trainable", True)):
        module = SpikingClassifier(conv_net(), lr=0.5, lr_step_epochs=0)
        recorder = GradRecorder()
        trainer = make_trainer(strategy=TruncatedLocalBPTT(k=4, n=1, classifier=kind), callbacks=[recorder])
        trainer.fit(module, event_batches(n=16, T=8, batch_size=8))
        expected = [LocalClassifier(4, copy.deepcopy(module.net[1]), kind=kind, seed=i) for i in range(2)]
        for i, (clf, ref) in enumerate(zip(trainer.strategy.local_classifiers, expected, strict=True)):
            ref(torch.zeros(1, 1, *clf_input_shape(i)))  # materialise from the same seed
            changed = not torch.equal(clf.linear.weight, ref.linear.weight)
            assert changed == should_change, f"{kind} classifier {i}: changed={changed}"
            assert clf.linear.weight.requires_grad == should_change
        if kind == "random":
            assert all("local_classifiers" not in name for name in recorder.steps[0])


def clf_input_shape(i: int) -> tuple[int, ...]:
    """Block outputs of `conv_net` on 8x8 input: [4, 4, 4] after block 0, [8, 2, 2] after block 1."""
    return (4, 4, 4) if i == 0 else (8, 2, 2)


def _peak_saved_bytes(make_trainer, k: int, n: int, T: int = 16) -> int:
    module = SpikingClassifier(conv_net(), lr=0.1, lr_step_epochs=0)
    loader = event_batches(n=16, T=T, batch_size=16)
    with SavedTensorsMeter() as meter:
        make_trainer(strategy=TruncatedLocalBPTT(k=k, n=n), max_steps=T // k).fit(module, loader)
    return meter.peak_bytes


def test_truncation_and_local_blocks_shrink_saved_activation_memory(make_trainer):
    # the first conv saves a chunk of the input batch, a view the meter counts as the batch's whole storage: data
    # that exists whatever k is, so it is left out of the ratio
    data = next(iter(event_batches(n=16, T=16, batch_size=16)))[0].nbytes
    full = _peak_saved_bytes(make_trainer, k=16, n=99) - data
    quarter = _peak_saved_bytes(make_trainer, k=4, n=99) - data
    quarter_local = _peak_saved_bytes(make_trainer, k=4, n=1) - data
    assert quarter <= 0.3 * full, (quarter, full)
    assert quarter_local < quarter, (quarter_local, quarter)


class SingleStepModule(SpikingClassifier):
    """A module whose network runs one time step per call (``step_mode='s'``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        functional.reset_net(self.net)
        return functional.multi_step_forward(x.transpose(0, 1), self.net)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_single_step_networks_and_precision_plugins(make_trainer, precision):
    loader = event_batches(n=8, T=4, batch_size=8)
    reference = conv_net()
    functional.set_step_mode(reference, "s")
    net = conv_net()
    functional.set_step_mode(net, "s")
    recorder = GradRecorder()
    trainer = make_trainer(
        strategy=TruncatedLocalBPTT(k=4, n=99), max_steps=1, callbacks=[recorder], precision=precision
    )
    trainer.fit(SingleStepModule(net, lr_step_epochs=0), loader)

    x, y = next(iter(loader))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        out = functional.multi_step_forward(x.transpose(0, 1), reference)
        loss = F.mse_loss(out.float().mean(0), F.one_hot(y, 4).float())
    loss.backward()
    _assert_all_nonzero(recorder.steps[0])
    tol = 1e-6 if precision == "32-true" else 1e-2
    for name, p in reference.named_parameters():
        torch.testing.assert_close(recorder.steps[0][f"net.{name}"], p.grad, atol=tol, rtol=tol)


def test_packed_spikes_train_bit_identically_and_save_less(make_trainer):
    weights, peaks = [], []
    for pack in (False, True):
        module = SpikingClassifier(wide_net(dropout=False), lr=0.1, lr_step_epochs=0)  # its second conv saves spikes
        with SavedTensorsMeter() as meter:
            make_trainer(strategy=TruncatedLocalBPTT(k=4, n=1, pack_spikes=pack), max_steps=4).fit(
                module, event_batches(n=16, T=8, batch_size=16)
            )
        weights.append([p.detach().clone() for p in module.net.parameters()])
        peaks.append(meter.peak_bytes)
    for a, b in zip(*weights, strict=True):
        assert torch.equal(a, b)
    assert peaks[1] < peaks[0], peaks

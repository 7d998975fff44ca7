"""The paper's classifier configured by plain values, and each dataset's paper setting for it.

:class:`PaperClassifier` builds a Table 2 network from its name and sizes, so that LightningCLI configs, the
``tlbptt train`` command and the sweeps (all in the :mod:`tlbptt` package) and a Python user can ask for a paper
setting by value; :func:`paper_setting` gives those values for a dataset of
:data:`~lightning_tlbptt.paper.settings.DATASETS`, the one place the paper's values live.

Both default to the recipe the accuracy study found (``docs/results.md``), with switches back to the paper's raw
values:

* **the output layer's bias balanced from one batch** (``PaperClassifier(balance_output=True)``): when training
  starts, one training batch runs through the network (evaluation mode, no gradients, the random stream forked so
  the run's batches and dropout masks stay as they were), and the output layer's bias is shifted so that each output
  neuron's mean input holds its membrane at threshold (:func:`lightning_tlbptt.classifiers.balance_bias`, the rule
  the strategy's local readouts start with). With the rectangular surrogate an output neuron whose membrane never
  comes near the threshold gets no gradient, never fires and its class is lost, in BPTT as in every truncated
  setting; at PyTorch's default init that decided which seeds ended 5-9 points low, and balancing removed it. It is
  kept there while the network learns: an output neuron that spiked on no sample of a whole training batch has its
  bias moved back by the same rule, on that batch's mean, when the next batch starts (the strategy's readouts' rule,
  applied by the callback :class:`~lightning_tlbptt.output_window.OutputWindow`, which the module configures itself);
  the outputs that fired are left alone. Balanced once, one seed in six of the truncated settings lost a digit this
  way and ended about 9 points low (``docs/results.md``, the fourth and fifth MNIST-5k runs).
* **the learning rate scaled to the batch** (``paper_setting(dataset, batch_size=..., scale_lr=True)``): Table 1's
  learning rate is for Table 1's batch; a smaller batch at the same rate takes larger steps per sample, so the rate
  is scaled linearly, ``lr = lr_paper * batch / batch_paper``.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from spikingjelly.activation_based import functional, neuron
from torch import Tensor, nn

from lightning_tlbptt.classifiers import balance_bias
from lightning_tlbptt.module import SpikingClassifier
from lightning_tlbptt.output_window import OutputWindow, output_layer
from lightning_tlbptt.paper.models import build_model
from lightning_tlbptt.paper.neuron import PaperNeuron
from lightning_tlbptt.paper.settings import dataset_spec

__all__ = ["PaperClassifier", "paper_setting"]


class PaperClassifier(SpikingClassifier):
    """:class:`SpikingClassifier` that builds a Table 2 network itself from plain values.

    LightningCLI and YAML configs can only pass values, not an ``nn.Module``; this class takes the network's
    name and sizes instead, and saves every argument as a hyperparameter, so that
    ``PaperClassifier.load_from_checkpoint(path)`` rebuilds the same network.

    Input ``[B, T, C, H, W]`` event frames (``T=None``), or static ``[B, C, H, W]`` images repeated over ``T``
    steps (the paper's direct encoding); output ``[T, B, num_classes]``.

    Args:
        model: a key of :data:`~lightning_tlbptt.paper.models.MODELS` (``lenet1``, ``lenet2``, ``alexnet``,
            ``vgg11``, ``resnet18``).
        in_channels: ``C`` of the input (1 for grey images, 3 for RGB, 2 event polarities).
        num_classes: width of the output layer.
        input_size: ``(H, W)`` of the input.
        tau_p: the paper's leaky constant (decay factor per step, Table 1's "tau").
        u_th: firing threshold.
        a: width of the rectangular surrogate gradient.
        dropout: dropout rate after every hidden layer (0 disables it).
        balance_output: balance the output layer's bias from one training batch when training starts (module
            docstring); done once, recorded in the buffer ``output_balanced`` (so in checkpoints: a resumed fit does
            not redo it); then move an output that fell silent for a whole training batch back. Networks whose
            output has no neuron (VGG11, ResNet18: logits for cross-entropy) have nothing to balance. ``False``:
            PyTorch's default init, as the paper.
        **options: :class:`SpikingClassifier`'s: ``T``, ``batch_layout``, ``loss`` (``"mse"`` on output firing
            rates, Eq. 3, for LeNet and AlexNet; ``"ce"`` for VGG11 and ResNet18), ``optimizer`` (``"sgd"`` with
            ``momentum``, or ``"adam"``), ``lr``, ``momentum``, ``weight_decay``, ``lr_step_epochs`` (20 in the
            paper), ``lr_gamma``.
    """

    def __init__(
        self,
        model: str = "lenet1",
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: tuple[int, int] = (28, 28),
        tau_p: float = 0.8,
        u_th: float = 0.5,
        a: float = 0.5,
        dropout: float = 0.0,
        balance_output: bool = True,
        **options: Any,
    ) -> None:
        net = build_model(
            model,
            in_channels=in_channels,
            num_classes=num_classes,
            input_size=tuple(input_size),
            neuron=PaperNeuron(tau_p=tau_p, u_th=u_th, a=a),
            dropout=dropout,
        )
        if not isinstance(options.get("loss", "mse"), str):
            raise ValueError("PaperClassifier takes loss by name ('mse' or 'ce'), so that checkpoints can rebuild it")
        super().__init__(net, num_classes, **options)
        # Every argument, SpikingClassifier's defaults included, is needed to rebuild the network from a
        # checkpoint; SpikingClassifier leaves `loss` out (it may be a callable there), here it is a name.
        own = {
            "model": model,
            "in_channels": in_channels,
            "num_classes": num_classes,
            "input_size": input_size,
            "tau_p": tau_p,
            "u_th": u_th,
            "a": a,
            "dropout": dropout,
            "balance_output": balance_output,
        }
        self.save_hyperparameters({**own, **self.hparams, "loss": options.get("loss", "mse")})
        self.register_buffer("output_balanced", torch.tensor(False))

    def configure_callbacks(self) -> list[Callback]:
        """The output layer kept inside its window after its balance (``balance_output``; :class:`OutputWindow`)."""
        if not self.hparams.balance_output or output_layer(self.net) is None:
            return []
        return [OutputWindow(balance=False)]  # started here, from the first batch in evaluation mode

    def on_train_start(self) -> None:
        """Balance the output layer's bias from the first training batch, once (``balance_output``)."""
        output = output_layer(self.net) if self.hparams.balance_output else None
        if output is not None and not bool(self.output_balanced):
            self._balance(*output)

    def _balance(self, linear: nn.Linear, node: neuron.BaseNode) -> None:
        currents: list[Tensor] = []
        handle = linear.register_forward_hook(lambda _m, _a, out: currents.append(out.detach()))
        trainer = self.trainer
        # the batches and dropout masks of the run stay those it would have drawn without this batch
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), torch.no_grad():
            loader = CombinedLoader(trainer.train_dataloader, "max_size_cycle")
            iter(loader)
            batch, _, _ = next(loader)
            batch = trainer.strategy.batch_to_device(batch)
            self.eval()
            try:
                self(batch[0])
            finally:
                self.train()
                handle.remove()
                functional.reset_net(self.net)
        balance_bias(linear, node, torch.cat([c.flatten(0, -2) for c in currents]))
        self.output_balanced.fill_(True)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # a checkpoint saved before `output_balanced` existed holds a trained network: never balance it again
        state_dict.setdefault(prefix + "output_balanced", torch.tensor(True))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def setup(self, stage: str) -> None:
        """Check that the data module fits the network before any batch is drawn.

        A mismatch would otherwise surface as a shape error inside a conv, or, for static images without
        ``T``, as a silently wrong run: ``[B, C, H, W]`` read as ``[B, T=C, H, W]``.
        """
        datamodule = self.trainer.datamodule
        if datamodule is None:
            return
        hp = self.hparams
        where = f"{type(datamodule).__name__} and {type(self).__name__}"
        for name in ("num_classes", "in_channels", "input_size"):
            if hasattr(datamodule, name) and _as_tuple(getattr(datamodule, name)) != _as_tuple(hp[name]):
                raise ValueError(
                    f"{where} disagree: the data have {name}={getattr(datamodule, name)}, the model "
                    f"{name}={hp[name]}; set the model's {name} to the data's."
                )
        if not hasattr(datamodule, "n_steps"):
            return
        if datamodule.n_steps is None and self.T is None:
            raise ValueError(
                f"{where}: {type(datamodule).__name__} yields static images [B, C, H, W]; set the model's T "
                "(time steps to repeat them over, the paper's direct encoding)."
            )
        if datamodule.n_steps is not None and self.T is not None:
            raise ValueError(
                f"{where}: {type(datamodule).__name__} yields [B, T={datamodule.n_steps}, ...] event frames; "
                f"leave the model's T unset (it is {self.T}), or set the data's n_steps to change T."
            )


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def paper_setting(dataset: str, *, batch_size: int | None = None, scale_lr: bool = True) -> dict[str, Any]:
    """:class:`PaperClassifier` keyword arguments for ``dataset``'s paper setting (Table 1 via ``DATASETS``).

    Where Table 1 gives a range, the lower end is taken for the dropout rate, 0, i.e. no dropout (every range starts
    at 0). The neuron is the registry's (the middle of the threshold range). ``T`` is set for static images only;
    event frames carry their own ``T``.

    The learning rate is the recipe's (module docstring): ``recipe_lr`` at Table 1's batch, scaled to ``batch_size``
    (default: the dataset's batch), ``recipe_lr * batch_size / lr_batch_size``; on MNIST-5k 0.4 * 128 / 1,024 = 0.05.
    ``scale_lr=False`` gives the paper's raw value instead: the lower end of Table 1's range, whatever the batch
    (MNIST-5k: 0.2, which collapsed 5 of 12 truncated runs of a 2-epoch study at batch 128).
    """
    spec = dataset_spec(dataset)
    batch = spec.batch_size if batch_size is None else batch_size
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch_size must be a positive int (the batch the learning rate is scaled to), got {batch!r}")
    lr = spec.recipe_lr * batch / spec.lr_batch_size if scale_lr else spec.lr_range[0]
    return {
        "model": spec.model,
        "in_channels": spec.in_channels,
        "num_classes": spec.num_classes,
        "input_size": spec.input_size,
        "tau_p": spec.neuron.tau_p,
        "u_th": spec.neuron.u_th,
        "a": spec.neuron.a,
        "dropout": spec.dropout_range[0],
        "T": spec.n_steps if spec.static else None,
        "loss": spec.loss,
        "optimizer": spec.optimizer,
        "lr": lr,
        "momentum": spec.momentum or 0.0,
    }

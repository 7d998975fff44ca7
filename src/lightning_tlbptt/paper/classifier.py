"""The paper's classifier configured by plain values, and each dataset's paper setting for it.

:class:`PaperClassifier` builds a Table 2 network from its name and sizes, so that LightningCLI configs, the
``tlbptt train`` command and the sweeps (all in the :mod:`tlbptt` package) and a Python user can ask for a paper
setting by value; :func:`paper_setting` gives those values for a dataset of
:data:`~lightning_tlbptt.paper.settings.DATASETS`, the one place the paper's values live.
"""

from __future__ import annotations

from typing import Any

from lightning_tlbptt.module import SpikingClassifier
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
        }
        self.save_hyperparameters({**own, **self.hparams, "loss": options.get("loss", "mse")})

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


def paper_setting(dataset: str) -> dict[str, Any]:
    """:class:`PaperClassifier` keyword arguments for ``dataset``'s paper setting (Table 1 via ``DATASETS``).

    Where Table 1 gives a range, the lower end is taken: for the learning rate the conservative value, for the
    dropout rate 0, i.e. no dropout (every range starts at 0). The neuron is the registry's (the middle of the
    threshold range). ``T`` is set for static images only; event frames carry their own ``T``.
    """
    spec = dataset_spec(dataset)
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
        "lr": spec.lr_range[0],
        "momentum": spec.momentum or 0.0,
    }

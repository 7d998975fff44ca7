"""The paper's LIF neuron (Guo et al. 2023, Eqs. 1, 2, 6) as SpikingJelly ``LIFNode`` settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spikingjelly.activation_based import surrogate
from spikingjelly.activation_based.neuron import LIFNode

__all__ = ["PaperNeuron"]


@dataclass(frozen=True)
class PaperNeuron:
    """The paper's LIF neuron (Eqs. 1, 2, 6) as SpikingJelly ``LIFNode`` settings.

    The paper's leaky constant is a decay factor: ``u <- tau_p * u + W s`` (Eq. 1). SpikingJelly's
    ``LIFNode(tau, decay_input=False, v_reset=None)`` computes ``u <- (1 - 1/tau) * u + x``, so
    ``tau = 1 / (1 - tau_p)``. ``v_reset=None`` is the soft reset, which subtracts the threshold:
    the paper's reset constant theta is taken equal to ``u_th``. The rectangular surrogate of width
    ``a`` and height ``1/a`` (Eq. 6) is ``surrogate.Rect(alpha=1/a)``.

    Args:
        tau_p: leaky constant (decay factor per time step), in (0, 1). Table 1 uses 0.3-0.9.
        u_th: firing threshold, > 0.
        a: width of the rectangular surrogate gradient window, > 0 (0.5 in all of Table 1).
        detach_reset: detach the reset term from the graph; ``False`` back-propagates through it,
            as Eq. 4 (its ``-theta`` term) does.
    """

    tau_p: float = 0.8
    u_th: float = 0.5
    a: float = 0.5
    detach_reset: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.tau_p < 1.0:
            raise ValueError(f"tau_p must lie in (0, 1) (decay factor per step), got {self.tau_p}")
        if not self.u_th > 0.0:
            raise ValueError(f"u_th (firing threshold) must be > 0, got {self.u_th}")
        if not self.a > 0.0:
            raise ValueError(f"a (surrogate gradient width) must be > 0, got {self.a}")

    def lif_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``neuron.LIFNode`` for this neuron, in multi-step mode."""
        return {
            # SpikingJelly asserts python floats with tau > 1.
            "tau": float(1.0 / (1.0 - self.tau_p)),
            "decay_input": False,
            "v_threshold": float(self.u_th),
            "v_reset": None,
            "surrogate_function": surrogate.Rect(alpha=1.0 / self.a),
            "detach_reset": self.detach_reset,
            "step_mode": "m",
        }

    def make(self) -> LIFNode:
        """A new ``LIFNode`` in multi-step mode (input ``[T, ...]``)."""
        return LIFNode(**self.lif_kwargs())

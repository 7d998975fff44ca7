"""The strategies for the standalone ``pytorch_lightning`` package, made from the same source.

``pytorch_lightning`` is Lightning's own mirror of ``lightning.pytorch``: the same code under another name, installed
with ``lightning``. Its ``Trainer`` accepts only its own ``Strategy`` subclasses, and ``lightning.Trainer`` only
``lightning`` modules, so a project written with ``import pytorch_lightning as pl`` needs strategies built on
``pytorch_lightning``'s classes. The modules that name Lightning's classes (:mod:`~lightning_tlbptt.strategy`,
:mod:`~lightning_tlbptt.ddp` and :mod:`~lightning_tlbptt._lightning`) are loaded a second time from their source
with ``lightning.pytorch`` read as ``pytorch_lightning``; the rest of the package uses only Lightning's utilities and
is shared.

Users of either package write the same line: ``TruncatedLocalBPTT`` is registered as a virtual subclass of
``pytorch_lightning``'s ``Strategy`` (so that ``pytorch_lightning.Trainer`` takes it), and turns into its twin when
that Trainer hands it its accelerator, the first thing a Trainer does with a strategy (:func:`counterpart`).
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

__all__ = ["counterpart", "load", "register"]

_PREFIX = "lightning_tlbptt._pl"


def _load(name: str, replace: dict[str, str], preset: dict[str, object]) -> ModuleType:
    qualified = f"{_PREFIX}_{name.lstrip('_')}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    spec = importlib.util.find_spec(f"lightning_tlbptt.{name}")
    assert spec is not None and spec.origin is not None
    with open(spec.origin, encoding="utf-8") as f:
        source = f.read().replace("lightning.pytorch", "pytorch_lightning")
    for old, new in replace.items():
        if old not in source:
            raise ImportError(f"lightning_tlbptt.{name} no longer contains {old!r}: update _twin.py")
        source = source.replace(old, new)
    module = ModuleType(qualified)
    module.__file__ = spec.origin
    module.__dict__.update(preset)
    sys.modules[qualified] = module
    exec(compile(source, spec.origin, "exec"), module.__dict__)
    return module


def load() -> ModuleType:
    """The ``pytorch_lightning`` twin of :mod:`lightning_tlbptt.ddp` (which holds both strategies' names)."""
    private = _load("_lightning", {}, {})
    strategy = _load(
        "strategy",
        {"from lightning_tlbptt import _lightning, _twin, ": "from lightning_tlbptt import _twin, "},
        {"_lightning": private},
    )
    return _load(
        "ddp",
        {
            "from lightning_tlbptt import _lightning, _twin\n": "from lightning_tlbptt import _twin\n",
            "from lightning_tlbptt.strategy import TruncatedLocalBPTT, _Algorithm\n": "",
        },
        {"_lightning": private, "TruncatedLocalBPTT": strategy.TruncatedLocalBPTT, "_Algorithm": strategy._Algorithm},
    )


def counterpart(cls: type, accelerator: object) -> type | None:
    """The strategy class of the package ``accelerator`` comes from, if that is not ``cls``'s own."""
    theirs = type(accelerator).__module__.split(".")[0]
    ours = "pytorch_lightning" if cls.__module__.startswith(_PREFIX) else "lightning"
    if theirs == ours or theirs not in ("lightning", "pytorch_lightning"):
        return None
    module = load() if theirs == "pytorch_lightning" else importlib.import_module("lightning_tlbptt.ddp")
    return getattr(module, cls.__name__)


def register(*classes: type) -> None:
    """Let ``pytorch_lightning.Trainer`` accept ``classes`` (as virtual subclasses of its ``Strategy``) and know the
    strategies' registered names (by loading the twin, which registers its classes in its own registry)."""
    try:
        from pytorch_lightning.strategies import Strategy
    except ImportError:  # only lightning installed: nothing to register with
        return
    for cls in classes:
        Strategy.register(cls)
    if not any(cls.__module__.startswith(_PREFIX) for cls in classes):
        load()

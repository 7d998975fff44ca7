"""The local classifiers in the user's optimizer and in checkpoints, kept apart from everything plain Lightning saves.

The local classifiers belong to the strategy, not to the user's module: callbacks that copy the module
(``EMAWeightAveraging``, ``StochasticWeightAveraging``) pair its parameters as the user made them, and the module's
``state_dict`` loads into the same module under a plain ``Trainer``. Their parameters train in the user's optimizer
as one extra parameter group, a copy of the first group's settings (learning rate, momentum, the per-group keys a
scheduler added), appended last; every per-group list a scheduler keeps gets the first group's entry too, so the
schedule drives the readouts as it drives the network.

In a checkpoint, the optimizer's state is written without that group, and the classifiers, their group's state and
the settings they were made with go under :data:`CHECKPOINT_KEY`. So checkpoints go both ways: a plain Lightning
checkpoint resumes under the strategy (its step, epoch and optimizer state, with fresh local classifiers), and the
strategy's resumes under a plain ``Trainer``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

__all__ = [
    "CHECKPOINT_KEY",
    "SETTINGS",
    "add_group",
    "check_settings",
    "extend_schedulers",
    "join",
    "load_group",
    "prefer_foreach",
    "saved_entry",
    "strip_group",
    "strip_local_classifiers",
    "take_classifiers",
    "with_classifiers",
]

CHECKPOINT_KEY = "tlbptt"
"""Checkpoint entry holding the local classifiers, their optimizer state and the settings they were made with."""

LEGACY_PREFIX = "local_classifiers."
"""0.2 kept the classifiers inside the module, so its checkpoints hold them in ``state_dict`` under this prefix."""

SETTINGS = ("n", "classifier", "classifier_pool", "seed")
"""The strategy's arguments the local classifiers are made from: resuming them needs the same ones."""

_PER_GROUP = ("base_lrs", "_last_lr", "lr_lambdas", "max_lrs", "min_lrs", "base_momentums", "max_momentums")


def prefer_foreach(optimizer: torch.optim.Optimizer) -> None:
    """Algorithm 1 steps ``T / k`` times per batch: an optimizer left to choose its implementation (``foreach=None``,
    which torch resolves to a per-tensor loop off CUDA) takes its one-kernel-per-op path."""
    for group in optimizer.param_groups:
        if "foreach" in group and group["foreach"] is None and not group.get("fused"):
            group["foreach"] = True


def join(
    classifiers: nn.ModuleList,
    optimizer: torch.optim.Optimizer,
    schedulers: list[Any],
    pending: Mapping[str, Any] | None,
    settings: Mapping[str, Any],
) -> None:
    """The classifiers' trainable parameters into ``optimizer`` (and its schedulers), and their state from a
    checkpoint's entry (``pending``) if the fit resumed one."""
    trainable = [p for p in classifiers.parameters() if p.requires_grad]
    if trainable:
        add_group(optimizer, trainable)
        extend_schedulers(schedulers, len(optimizer.param_groups))
    if pending is not None:
        check_settings(pending, settings)
        classifiers.load_state_dict(pending["state_dict"])
        if trainable and pending.get("optimizer"):
            load_group(optimizer, trainable, pending["optimizer"])


def add_group(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Append ``params`` as a group with the first group's settings."""
    settings = {key: value for key, value in optimizer.param_groups[0].items() if key != "params"}
    optimizer.add_param_group({**settings, "params": params})


def extend_schedulers(schedulers: list[Any], groups: int) -> None:
    """Give every per-group list of every scheduler ``groups`` entries, the new ones copies of the first.

    Idempotent: called when the group is added, and again after a checkpoint restored the schedulers' state."""
    for scheduler in _flatten(schedulers):
        for name in _PER_GROUP:
            values = getattr(scheduler, name, None)
            if isinstance(values, list) and 0 < len(values) < groups:
                values.extend(values[:1] * (groups - len(values)))


def strip_group(state: dict[str, Any], groups: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Split an optimizer ``state_dict`` with the classifiers' group last into (the user's part, the group's part).

    ``groups``: the number of groups the user configured."""
    if len(state["param_groups"]) <= groups:
        return state, None
    ours = state["param_groups"][groups:]
    ids = {i for group in ours for i in group["params"]}
    user = {
        "state": {i: s for i, s in state["state"].items() if i not in ids},
        "param_groups": state["param_groups"][:groups],
    }
    group = {"param_groups": ours, "state": [state["state"].get(i) for g in ours for i in g["params"]]}
    return user, group


def load_group(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], saved: Mapping[str, Any]) -> None:
    """Restore the classifiers' group (the last) from :func:`strip_group`'s part."""
    group = optimizer.param_groups[-1]
    settings = saved["param_groups"][0]
    group.update({key: value for key, value in settings.items() if key != "params"})
    for p, state in zip(params, saved["state"], strict=True):
        if state is not None:
            optimizer.state[p] = {
                key: value.to(p.device) if isinstance(value, torch.Tensor) and value.dim() else value
                for key, value in state.items()
            }


def with_classifiers(
    checkpoint: dict[str, Any], classifiers: nn.ModuleList, user_groups: int, settings: dict[str, Any]
) -> dict[str, Any]:
    """The checkpoint to write: the optimizer's state without the classifiers' group, the classifiers, their group
    and ``settings`` under :data:`CHECKPOINT_KEY`."""
    group = None
    if checkpoint.get("optimizer_states"):
        user, group = strip_group(checkpoint["optimizer_states"][0], user_groups)
        checkpoint = {**checkpoint, "optimizer_states": [user, *checkpoint["optimizer_states"][1:]]}
    return {**checkpoint, CHECKPOINT_KEY: saved_entry(classifiers, group, settings)}


def take_classifiers(checkpoint: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the checkpoint with the module's own ``state_dict``, the classifiers' entry to restore once they exist)."""
    state_dict = dict(checkpoint["state_dict"])
    legacy = pop_legacy(state_dict)
    saved = checkpoint.get(CHECKPOINT_KEY)
    if legacy:  # written by 0.2, which kept the classifiers inside the module
        saved = {**(saved or {}), "state_dict": legacy}
    pending = dict(saved) if saved and saved.get("state_dict") is not None else None
    return {**checkpoint, "state_dict": state_dict}, pending


def saved_entry(classifiers: nn.ModuleList, group: dict[str, Any] | None, settings: dict[str, Any]) -> dict[str, Any]:
    """What goes under :data:`CHECKPOINT_KEY`."""
    return {"state_dict": classifiers.state_dict(), "optimizer": group, "settings": settings}


def check_settings(saved: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
    """Refuse to resume local classifiers made with other settings, naming them (before any weight changes)."""
    changed = {k: (v, settings[k]) for k, v in saved.get("settings", {}).items() if k in settings and settings[k] != v}
    if changed:
        what = ", ".join(f"{k}={old!r} in the checkpoint but {k}={new!r} now" for k, (old, new) in changed.items())
        raise MisconfigurationException(
            f"cannot resume: the checkpoint's local classifiers were made with other settings ({what}). Resume with "
            "the checkpoint's settings, or start a new fit from its weights (load the module's state_dict without "
            "ckpt_path)."
        )


def pop_legacy(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Take 0.2's local classifiers out of a module ``state_dict`` (in place); return them without the prefix."""
    keys = [key for key in state_dict if key.startswith(LEGACY_PREFIX)]
    return {key[len(LEGACY_PREFIX) :]: state_dict.pop(key) for key in keys}


def strip_local_classifiers(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Remove what TruncatedLocalBPTT added to a checkpoint (for checkpoints written by 0.2, also from its
    ``state_dict``), so the module loads it strictly: ``torch.save(strip_local_classifiers(torch.load(p)), p)``."""
    checkpoint.pop(CHECKPOINT_KEY, None)
    pop_legacy(checkpoint["state_dict"])
    return checkpoint


def _flatten(schedulers: list[Any]) -> Iterator[Any]:
    for scheduler in schedulers:
        yield scheduler
        yield from _flatten(list(getattr(scheduler, "_schedulers", [])))

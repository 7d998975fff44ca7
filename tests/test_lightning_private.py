"""Every private Lightning name the strategy reaches into still exists in the installed Lightning (and in
``pytorch_lightning``, its mirror): an upgrade that drops one fails here, not in a user's run."""

from __future__ import annotations

import importlib
import inspect

import pytest

from lightning_tlbptt import _lightning


@pytest.mark.parametrize("package", ["lightning.pytorch", "pytorch_lightning"])
@pytest.mark.parametrize("name", _lightning.PRIVATE_NAMES)
def test_private_name_exists(name: str, package: str) -> None:
    path = name.replace("lightning.pytorch", package)
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attr in parts[split:]:
            if isinstance(obj, type) and attr not in dir(obj):
                # instance attributes set in __init__ (e.g. _skip_backward): look in the class's source
                assert f"self.{attr}" in inspect.getsource(obj), f"{path}: {attr} is gone"
                break
            obj = getattr(obj, attr)
        return
    pytest.fail(f"{path}: no module found")

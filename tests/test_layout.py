"""The layout: the core loads nothing of the layers above it, and imports go one way (apps -> paper -> measure -> core).

Layers, bottom up: the core (``lightning_tlbptt`` and its top-level modules), measurement
(``lightning_tlbptt.measure``), the paper's reproduction (``lightning_tlbptt.paper``) and the applications (the
``tlbptt`` package). See docs/layout.md.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = ("core", "measure", "paper", "apps")
UPPER = ("lightning_tlbptt.measure", "lightning_tlbptt.paper", "tlbptt")
# what the paper's reproduction and the applications need (the [paper] and [wandb] extras), never the core
EXTRAS = ("tonic", "mlxtend", "matplotlib", "jsonargparse", "torchvision", "yaml", "wandb", "aedat", "sklearn")
# pytorch_lightning: lightning's mirror package, installed with it; the core registers its strategies there too
CORE_DEPENDENCIES = (
    "torch",
    "lightning",
    "lightning_fabric",
    "lightning_utilities",
    "pytorch_lightning",
    "spikingjelly",
    "torchmetrics",
)


def _layer(module: str) -> str | None:
    """The layer of a project module (``None`` for anything else)."""
    top = module.split(".")
    if top[0] == "tlbptt":
        return "apps"
    if top[0] != "lightning_tlbptt":
        return None
    return top[1] if len(top) > 1 and top[1] in ("measure", "paper") else "core"


def _run(code: str) -> dict[str, list[str]]:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return json.loads(done.stdout.splitlines()[-1])


def _loaded_by(statement: str) -> dict[str, list[str]]:
    """Modules loaded before (the core's own dependencies) and added by ``statement``, in a fresh interpreter."""
    return _run(
        "import json, sys\n"
        "import torch, lightning.pytorch, torchmetrics, spikingjelly.activation_based.neuron\n"
        "before = set(sys.modules)\n"
        f"{statement}\n"
        "print(json.dumps({'before': sorted(before), 'added': sorted(set(sys.modules) - before)}))\n"
    )


def test_importing_the_core_loads_only_the_core():
    loaded = _loaded_by(
        "from lightning_tlbptt import TruncatedLocalBPTT, SpikingClassifier, observe, strip_local_classifiers"
    )
    added = set(loaded["added"])
    assert "lightning_tlbptt.strategy" in added  # the check would prove nothing if the import did nothing
    assert not {m for m in added if m.startswith(UPPER)}, "the core loaded a module of a layer above it"
    tops = {m.split(".")[0] for m in added}
    assert tops <= {"lightning_tlbptt", *CORE_DEPENDENCIES, *sys.stdlib_module_names}, tops
    # not loaded at all, or only by Lightning itself (with the [paper] extra installed it imports matplotlib,
    # torchvision and yaml when present): the core adds none of them
    assert not set(EXTRAS) & tops


def test_the_measure_layer_loads_no_paper_or_application_module():
    loaded = _loaded_by("import lightning_tlbptt.measure")
    added = set(loaded["added"])
    assert "lightning_tlbptt.measure.costs" in added and "lightning_tlbptt.measure.callbacks" in added
    assert not {m for m in added if m.startswith(("lightning_tlbptt.paper", "tlbptt"))}
    assert not {"tonic", "mlxtend", "jsonargparse", "wandb", "aedat"} & {m.split(".")[0] for m in added}


def test_the_paper_settings_models_and_classifier_load_no_dataset_library():
    added = set(
        _loaded_by(
            "from lightning_tlbptt.paper import PaperClassifier, paper_setting\n"
            "PaperClassifier(**paper_setting('cifar10'))"
        )["added"]
    )
    assert "lightning_tlbptt.paper.settings" in added
    assert not {m for m in added if m.startswith("lightning_tlbptt.paper.data")}
    assert not {"tonic", "mlxtend", "aedat"} & {m.split(".")[0] for m in added}


def test_the_paper_layer_loads_no_application_module():
    added = set(_loaded_by("import lightning_tlbptt.paper, lightning_tlbptt.paper.data")["added"])
    assert "lightning_tlbptt.paper.data.neuromorphic" in added
    assert not {m for m in added if m == "tlbptt" or m.startswith("tlbptt.")}


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_go_one_way(path: Path):
    """Every import in the source, function-level ones included, goes to the module's own layer or one below."""
    module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
    own = LAYERS.index(_layer(module))  # type: ignore[arg-type]
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        for name in names:
            layer = _layer(name)
            assert layer is None or LAYERS.index(layer) <= own, f"{module} (line {node.lineno}) imports {name}"


def test_measurement_and_paper_names_still_import_from_the_package():
    code = "from lightning_tlbptt import PaperClassifier, CostMonitor, build_model, estimate; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "ok\n"

"""The layout: importing the core loads nothing of the paper's reproduction or the applications."""

from __future__ import annotations

import subprocess
import sys

APPLICATION = ("paper", "data", "models", "sweeps", "cli", "compare", "callbacks", "costs")
THIRD_PARTY = ("tonic", "mlxtend", "jsonargparse", "wandb", "aedat", "sklearn")


def test_importing_the_core_loads_no_application_module():
    code = (
        "import sys\n"
        "from lightning_tlbptt import TruncatedLocalBPTT, SpikingClassifier, observe, strip_local_classifiers\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    loaded = set(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    )
    assert not {f"lightning_tlbptt.{name}" for name in APPLICATION} & loaded
    assert not set(THIRD_PARTY) & loaded
    assert "lightning_tlbptt.strategy" in loaded  # the check would prove nothing if the import did nothing


def test_measurement_and_paper_names_still_import_from_the_package():
    code = "from lightning_tlbptt import PaperClassifier, CostMonitor, build_model, estimate; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "ok\n"

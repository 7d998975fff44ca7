"""The paper's reproduction on top of the core: Table 1 settings, Table 2 networks, its neuron, data, classifier.

* :mod:`~lightning_tlbptt.paper.settings`: every dataset's paper setting (:data:`DATASETS`), the one place the
  paper's values live;
* :mod:`~lightning_tlbptt.paper.neuron`: the paper's LIF neuron (:class:`PaperNeuron`);
* :mod:`~lightning_tlbptt.paper.models`: the Table 2 networks (:data:`MODELS`, :func:`build_model`);
* :mod:`~lightning_tlbptt.paper.classifier`: :class:`PaperClassifier`, configured by plain values, and
  :func:`paper_setting`;
* :mod:`~lightning_tlbptt.paper.data`: the data modules (needs the ``[paper]`` extra; not imported here).

It uses the core and measurement, never the applications (the :mod:`tlbptt` package).
"""

from lightning_tlbptt.paper.classifier import PaperClassifier, paper_setting
from lightning_tlbptt.paper.models import ARCHITECTURES, MODELS, Architecture, build_model
from lightning_tlbptt.paper.neuron import PaperNeuron
from lightning_tlbptt.paper.settings import DATASETS, DatasetSpec, build_datamodule, dataset_spec

__all__ = [
    "ARCHITECTURES",
    "DATASETS",
    "MODELS",
    "Architecture",
    "DatasetSpec",
    "PaperClassifier",
    "PaperNeuron",
    "build_datamodule",
    "build_model",
    "dataset_spec",
    "paper_setting",
]

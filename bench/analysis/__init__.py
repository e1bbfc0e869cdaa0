"""Looking inside trained models: what the attention blocks compute, and the analyses of
the papers that introduced them. Library code for notebooks and figure scripts.

    from bench.analysis import load_run, collect, class_excitations, grad_cam

- ``collect``: channel gates ``(N, C)``, spatial maps ``(N, H, W)``, attention rows
  ``(N, Q, M)`` and pooling weights of every injected block on a batch (``BlockOutput``).
- ``class_excitations``, ``class_specificity``: SENet's excitation analysis (Sec. 7.2);
  ``hidden_activity``: how many hidden units of each excitation MLP ever fire.
- ``query_independence``, ``block_query_independence``: GCNet's cosine distance between
  the attention maps of different queries (Sec. 3).
- ``empirical_receptive_field``, ``theoretical_receptive_field``: ParseNet's Sec. 3.1.
- ``grad_cam``, ``default_target_layer``: Grad-CAM maps through pytorch_grad_cam.
- ``build_from_record``, ``load_weights``, ``load_run``: the trained model of a run.
"""

from .checkpoints import build_from_record, load_run, load_weights, model_state_dict
from .collect import DEFAULT_QUERIES, KINDS, BlockOutput, collect, query_positions, select
from .excitation import (
    ClassExcitation,
    HiddenActivity,
    class_excitations,
    class_specificity,
    hidden_activity,
)
from .gradcam import default_target_layer, grad_cam
from .query_independence import block_query_independence, query_independence
from .receptive_field import (
    EmpiricalReceptiveField,
    TheoreticalReceptiveField,
    empirical_receptive_field,
    theoretical_receptive_field,
)

__all__ = [
    "DEFAULT_QUERIES",
    "KINDS",
    "BlockOutput",
    "ClassExcitation",
    "EmpiricalReceptiveField",
    "HiddenActivity",
    "TheoreticalReceptiveField",
    "block_query_independence",
    "build_from_record",
    "class_excitations",
    "class_specificity",
    "collect",
    "default_target_layer",
    "empirical_receptive_field",
    "grad_cam",
    "hidden_activity",
    "load_run",
    "load_weights",
    "model_state_dict",
    "query_independence",
    "query_positions",
    "select",
    "theoretical_receptive_field",
]

"""The STAR MoE model library: configuration, GHA math, routers, experts and model heads.

It knows nothing of HTTP, Redis or Prometheus; the server's layers build on it.
"""

from .configuration import ROUTER_TYPES, StarMoeConfig
from .gha import (
    GhaStatistics,
    explained_variance,
    gha_statistics,
    gha_step,
    gha_update,
    orthogonality_defect,
    orthogonality_defects,
    orthonormalize,
    projection_distance,
    projection_distances,
    retract,
)
from .modeling import (
    StarMoeForCausalLM,
    StarMoeForSequenceClassification,
    StarMoeModel,
    StarMoePreTrainedModel,
)
from .router import switch_load_balancing_loss
from .routing import RouterUpdate, Routing

__all__ = [
    "ROUTER_TYPES",
    "GhaStatistics",
    "RouterUpdate",
    "Routing",
    "StarMoeConfig",
    "StarMoeForCausalLM",
    "StarMoeForSequenceClassification",
    "StarMoeModel",
    "StarMoePreTrainedModel",
    "explained_variance",
    "gha_statistics",
    "gha_step",
    "gha_update",
    "orthogonality_defect",
    "orthogonality_defects",
    "orthonormalize",
    "projection_distance",
    "projection_distances",
    "register_auto_classes",
    "retract",
    "switch_load_balancing_loss",
]


def register_auto_classes() -> None:
    """Makes `model_type: "star_moe"` loadable through transformers' Auto classes. Idempotent."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    AutoConfig.register(StarMoeConfig.model_type, StarMoeConfig, exist_ok=True)
    AutoModel.register(StarMoeConfig, StarMoeModel, exist_ok=True)
    AutoModelForCausalLM.register(StarMoeConfig, StarMoeForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(StarMoeConfig, StarMoeForSequenceClassification, exist_ok=True)


register_auto_classes()

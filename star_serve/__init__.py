"""star-serve: an inference server for STAR Mixture-of-Experts models with per-tenant routing adaptation.

Importing the package registers `model_type: "star_moe"` with transformers' Auto classes.
"""

from .model import StarMoeConfig, StarMoeForCausalLM, StarMoeForSequenceClassification

__version__ = "0.1.0"
__all__ = ["StarMoeConfig", "StarMoeForCausalLM", "StarMoeForSequenceClassification", "__version__"]

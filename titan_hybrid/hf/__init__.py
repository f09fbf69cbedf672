"""Hugging Face classes of the hybrid LM; ``titan_hybrid.export`` writes folders that load with them."""

from .configuration_titan_hybrid import TitanHybridConfig
from .modeling_titan_hybrid import TitanHybridForCausalLM

__all__ = ["TitanHybridConfig", "TitanHybridForCausalLM"]

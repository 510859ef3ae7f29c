"""glm4: run, serve and fine-tune the GLM-4-0414 model family from its Hugging Face checkpoints."""

from glm4.cache import DynamicCache, KVCache
from glm4.config import Glm4Config
from glm4.heads import Glm4ForSequenceClassification, Glm4ForTokenClassification
from glm4.modeling import Glm4ForCausalLM, Glm4Model

__version__ = "0.1.0"

__all__ = [
    "DynamicCache",
    "Glm4Config",
    "Glm4ForCausalLM",
    "Glm4ForSequenceClassification",
    "Glm4ForTokenClassification",
    "Glm4Model",
    "KVCache",
    "__version__",
]

"""indexcache: fast long-context inference for DeepSeek-Sparse-Attention models by reusing top-k indices
across layers (IndexCache, arXiv 2603.12201)."""
from .checkpoint import load_model, save_checkpoint
from .config import ModelConfig
from .llm import LLM, RequestOutput
from .model import DSAModel, DSAOutput
from .pattern import IndexPattern, PatternError
from .sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["load_model", "save_checkpoint", "ModelConfig", "DSAModel", "DSAOutput", "IndexPattern", "PatternError",
           "LLM", "SamplingParams", "RequestOutput"]

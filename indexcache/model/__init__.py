from .indexer import Selection
from .transformer import DSAModel, DSAOutput

__all__ = ["DSAModel", "DSAOutput", "Selection"]

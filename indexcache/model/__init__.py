from .transformer import DSAModel, DSAOutput

__all__ = ["DSAModel", "DSAOutput"]

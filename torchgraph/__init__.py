"""torchgraph: build PyTorch models symbolically, get plain torch.fx GraphModules back."""

__version__ = "0.1.0"

__all__ = ["__version__"]

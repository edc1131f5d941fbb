"""torchgraph: build PyTorch models symbolically, get plain torch.fx GraphModules back.

Example:
    >>> import torch, torch.nn as nn, torch.nn.functional as F, torchgraph as tg
    >>> x = tg.Input(shape=(3, 32, 32))
    >>> h = F.relu(nn.Conv2d(3, 16, 3)(x))
    >>> y = nn.Linear(16, 10)(h.mean(dim=(2, 3)))
    >>> model = tg.Model(x, y)
    >>> model(torch.randn(4, 3, 32, 32)).shape
    torch.Size([4, 10])
"""

from .clone import clone_model
from .config import model_from_json
from .config_values import register_value_type
from .cpu_memory import retain_freed_memory
from .errors import GraphBuildError
from .export import export_onnx
from .from_module import from_module
from .layer_config import register_layer
from .model import Model
from .naming import name
from .optimize import optimize
from .plot import model_to_dot, plot_model
from .profile import profile
from .sequential import Sequential
from .symbolic import Dim, Input, SymbolicInt, SymbolicTensor
from .saving import load, save
from .scopes import scope
from .summary import summary
from . import applications, callbacks, layers, ops, saving

__version__ = "0.1.0"

__all__ = [
    "Dim",
    "GraphBuildError",
    "applications",
    "callbacks",
    "clone_model",
    "export_onnx",
    "from_module",
    "layers",
    "load",
    "model_from_json",
    "register_layer",
    "register_value_type",
    "retain_freed_memory",
    "save",
    "scope",
    "summary",
    "saving",
    "Input",
    "Model",
    "SymbolicInt",
    "SymbolicTensor",
    "model_to_dot",
    "name",
    "ops",
    "optimize",
    "plot_model",
    "profile",
    "Sequential",
    "__version__",
]

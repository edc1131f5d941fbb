"""The one library-specific exception."""

__all__ = ["GraphBuildError", "RandomDrawError"]


class GraphBuildError(ValueError):
    """A mistake found while building a model: a bad layer call, a disconnected graph, a bad name.

    Raised at the line that made the mistake, before any data flows. The message names the layer
    (or function), the shapes it received (dynamic dims shown as ``None`` or by name), what was
    expected and, when it is knowable, how to fix it.

    Example:
        >>> import torch, torchgraph as tg
        >>> x = tg.Input(shape=(32,))
        >>> try:
        ...     torch.nn.Linear(64, 10)(x)
        ... except tg.GraphBuildError as e:
        ...     print("in_features=64" in str(e))
        True
    """


class RandomDrawError(GraphBuildError):
    """A forward draws random numbers that no input's values carry (``torch.rand(()) < p``,
    ``random.random()``): a recording would bake them into the graph. The module that draws stays
    one opaque layer; at the top level of ``tg.from_module`` the build fails with this error."""

"""The torch function mode stack: pushing a mode, and taking one off from anywhere in the stack.

A module scope's :class:`~torchgraph.scope_replay.ScopeMode` is pushed and removed by torchgraph
itself, not by ``with mode:``: it must come off when the module call ends, wherever other modes were
pushed above it meanwhile. ``tg.from_module``'s recording mode takes itself off the same way after
pushing itself again inside its own handler.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["push_mode", "remove_mode"]


def push_mode(mode: TorchFunctionMode) -> None:
    """Put ``mode`` on top of this thread's mode stack (without entering it as a context manager)."""
    torch._C._push_on_torch_function_stack(mode)


def remove_mode(mode: TorchFunctionMode) -> bool:
    """Take ``mode`` off this thread's mode stack wherever it is; False if it is not there."""
    n = torch._C._len_torch_function_stack()
    above = []
    found = False
    for _ in range(n):
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            found = True
            break
        above.append(top)
    for m in reversed(above):
        torch._C._push_on_torch_function_stack(m)
    return found

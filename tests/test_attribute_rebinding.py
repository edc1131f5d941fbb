"""A forward that re-binds one of its module's tensor attributes, as Meta's reference LLaMA does on its first
line (``self.freqs_cis = self.freqs_cis.to(h.device)``): building, recording and optimizing it work, and the
user's module is left exactly as it was (NOTE: [Attributes between shadow runs] in restoring.py, NOTE:
[Attributes a recording sets] in from_module.py, NOTE: [Attributes a trace sets] in passes/inline.py)."""

import pytest
import torch
import torch.nn as nn

import torchgraph as tg
from community_models.llama_meta import ModelArgs, Transformer
from torchgraph import ops, passes


@pytest.fixture
def llama():
    torch.manual_seed(0)
    net = Transformer(ModelArgs(n_kv_heads=2)).eval()
    return net, net.freqs_cis


def _data():
    return torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))


def _symbolic_or_proxy_attributes(model: nn.Module) -> list:
    return [(name, key) for name, m in model.named_modules() for key, value in vars(m).items()
            if type(value).__name__ in ("SymbolicTensor", "SymbolicInt", "Proxy")]


def test_meta_llama_builds_as_a_layer_and_leaves_its_table_alone(llama):
    net, table = llama
    tokens = tg.Input(shape=(16,), dtype=torch.long, name="tokens")
    model = tg.Model(tokens, net(tokens))
    assert net.freqs_cis is table  # the build did not re-bind it
    with torch.no_grad():
        torch.testing.assert_close(model(_data()), net(_data()), rtol=0, atol=0)


def test_meta_llama_records_with_from_module_and_leaves_its_table_alone(llama, tmp_path):
    """Before: the recording left a symbolic tensor on the user's module, and the recording in the other
    mode read it and failed, blaming a train/eval difference."""
    net, table = llama
    model = tg.from_module(net, tg.Input(shape=(16,), dtype=torch.long, name="tokens"))
    assert net.freqs_cis is table and not _symbolic_or_proxy_attributes(net)
    with torch.no_grad():
        torch.testing.assert_close(model(_data()), net(_data()), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_meta_llama_optimizes(llama, dtype):
    """Before: inlining traced the forward with torch.fx, the trace left a Proxy on the copy's attribute, and
    the optimized model raised fx's TraceError when called. Now its RMSNorms (Meta's spelling) fuse and it
    matches eager."""
    net, table = llama
    tokens = tg.Input(shape=(16,), dtype=torch.long, name="tokens")
    model = tg.Model(tokens, net(tokens))
    if dtype is not None and not passes.bfloat16_supported()[0]:
        pytest.skip("this CPU has no bfloat16 instructions")
    fast = tg.optimize(model, dtype=dtype)
    assert not _symbolic_or_proxy_attributes(fast) and net.freqs_cis is table
    norms = sum(1 for n in fast.graph.nodes if n.op == "call_function" and n.target is ops.rms_norm_inference)
    assert norms == 2 * 2 + 1  # two per block, one final
    with torch.no_grad():
        out, expected = fast(_data()), net(_data())
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype is None else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(out, expected, **tolerance)


class CachesItsScale(nn.Module):
    """Re-binds a tensor attribute to one computed from its input (a cache): recorded, the attribute keeps
    the user's tensor."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.last_scale = torch.ones(())

    def forward(self, x):
        self.last_scale = x.abs().mean()
        return self.fc(x) / self.last_scale


def test_a_cache_attribute_keeps_the_users_tensor_after_recording():
    net = CachesItsScale().eval()
    before = net.last_scale
    model = tg.from_module(net, tg.Input(shape=(8,)))
    assert net.last_scale is before
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x))

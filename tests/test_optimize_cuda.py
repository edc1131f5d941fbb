"""tg.optimize on a GPU: the community models optimized on the GPU (or on the CPU, then moved there) give
eager's outputs, stay on the GPU, and compute in bfloat16 there when asked, whatever the host CPU offers.

These tests need a CUDA GPU and are skipped without one (CI has none; run them where one is lent:
``python -m pytest tests/test_optimize_cuda.py``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import torchgraph as tg
from community_models import ARCHITECTURES, BENCHMARK_ARCHITECTURES, tensor_leaves
from test_optimize_community import (_as_list, _double, _record, assert_as_close_as_eager,
                                     assert_bfloat16_as_close_as_eager)
from torchgraph.model import OPTIMIZE_META

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _strict_float32():
    """TF32 off: cuDNN's convolutions default to it, and this compares float32 with float32 rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("order", ["recorded on the GPU", "moved, then optimized", "optimized, then moved"])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_optimized_matches_eager_on_the_gpu(name, order):
    """Every community architecture, whether the module was on the GPU when recorded (layers that need real
    probes get them there: NOTE: [Real probes where the weights are]) or the model moved there before or after
    tg.optimize: outputs on the GPU, within 4x eager float32's own rounding of float64."""
    arch = ARCHITECTURES[name]
    module = arch.make_model().eval()
    if order == "recorded on the GPU":
        fast = tg.optimize(_record(arch, module.cuda()))
    elif order == "moved, then optimized":
        fast = tg.optimize(_record(arch, module).cuda())
    else:
        fast = tg.optimize(_record(arch, module)).cuda()
    inputs = [t.cuda() for t in arch.make_inputs()]
    with torch.no_grad():
        exact = tensor_leaves(copy.deepcopy(module).double().cuda()(*[_double(t) for t in inputs]))
        expected = tensor_leaves(module.cuda()(*inputs))
        got = _as_list(fast(*inputs))
    assert_as_close_as_eager(got, expected, exact)


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "vit", "nanogpt", "transformer_classifier"])
def test_bfloat16_on_the_gpu(name):
    """dtype=torch.bfloat16 on a GPU model computes in bfloat16 there (even on a host CPU without bf16
    instructions): float32 in and out, no further from float32 eager than twice eager's own bf16 model.

    At benchmark size: at test size, ResNet-50's narrow layers blow bfloat16 rounding up to 60% of its
    output in eager itself (seen on an H200), which makes any bound a coin toss."""
    arch = BENCHMARK_ARCHITECTURES[name]
    module = arch.make_model().eval().cuda()
    fast = tg.optimize(_record(arch, module), dtype=torch.bfloat16)
    assert fast.meta[OPTIMIZE_META]["dtype"] == "bfloat16"
    assert {p.dtype for p in fast.parameters() if p.is_floating_point()} == {torch.bfloat16}
    assert_bfloat16_as_close_as_eager(module, fast, [t.cuda() for t in arch.make_inputs()])


def test_recurrent_weights_stay_in_one_buffer():
    """An LSTM optimized on the GPU runs on cuDNN's flattened weights (NOTE: [Copied RNN weights]): no call
    warns that they are not one contiguous chunk, and the outputs are eager's."""
    arch = ARCHITECTURES["lstm_encoder"]
    module = arch.make_model().eval().cuda()
    fast = tg.optimize(_record(arch, module))
    inputs = [t.cuda() for t in arch.make_inputs()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "RNN module weights are not part of single contiguous..."
        with torch.no_grad():
            got = _as_list(fast(*inputs))
    with torch.no_grad():
        expected = tensor_leaves(module(*inputs))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)

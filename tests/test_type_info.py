"""``torch.finfo(x.dtype).min`` in a build follows the model's dtype (torchgraph/type_info.py).

Every model here is compared with eager PyTorch bit for bit, in float32 and after ``.to(torch.bfloat16)``
(and float16) of both, with a fully masked row: float32's min folded into a bfloat16 model would be -inf
there, and the softmax of that row NaN where eager's is finite.
"""

import copy
import gc
import json
import pathlib
import pickle
import struct
import subprocess
import sys
import threading
import types
import warnings

import pytest
import torch
import torch.nn as nn
from community_models.hf import tiny_bert, tiny_bloom, tiny_deberta_v2, tiny_t5

import torchgraph as tg
from torchgraph import passes, type_info

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _mask(batch=3, length=7):
    """1 = token; row 1 fully masked, row 2 half padded."""
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1] = 0
    mask[2, length // 2:] = 0
    return mask


def _recorded(module, inputs):
    """tg.from_module, asserting that nothing stayed an opaque layer."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return tg.from_module(module, inputs)


def _assert_same(got, expected):
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype
        assert torch.equal(g, e), (g - e).abs().max()


class HFStyleAttention(nn.Module):
    """Masks the way HuggingFace writes them: an int mask times the min, masked_fill, torch.where."""

    def __init__(self, int_mask_output=True):
        super().__init__()
        self.int_mask_output = int_mask_output  # torch.onnx cannot export `1.0 - int_tensor` (with or without finfo)
        self.embed = nn.Embedding(50, 16)
        self.q = nn.Linear(16, 16)
        self.k = nn.Linear(16, 16)

    def forward(self, ids, mask):
        h = self.embed(ids)
        extended = (1.0 - mask[:, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        scores = self.q(h) @ self.k(h).transpose(1, 2) / 4 + extended
        scores = scores.masked_fill(mask[:, None, :] == 0, torch.finfo(scores.dtype).min)
        out = torch.softmax(scores, -1) @ h
        limit = torch.finfo(out.dtype).max - 1000
        bias = torch.where(mask[:, None, :] == 1, 0.0, torch.finfo(h.dtype).min)  # float32 in eager
        if not self.int_mask_output:
            return out.clamp(-limit, limit), bias
        promoted = (1.0 - mask) * torch.finfo(h.dtype).min  # an int mask with a Python float: float32 too
        return out.clamp(-limit, limit), bias, promoted


def _hf_style(int_mask_output=True):
    torch.manual_seed(0)
    net = HFStyleAttention(int_mask_output).eval()
    seq = tg.Dim("seq", max=32)
    model = _recorded(net, {"ids": tg.Input(shape=(seq,), dtype=torch.long),
                            "mask": tg.Input(shape=(seq,), dtype=torch.long)})
    return net, model


def test_from_module_records_finfo_so_masks_follow_the_dtype():
    """HF-style masking at the top level: exact in float32, bfloat16 and float16, fully masked row included."""
    net, model = _hf_style()
    assert "finfo_value" in model.code
    ids, mask = torch.randint(0, 50, (3, 7)), _mask()
    for dtype in DTYPES:
        net.to(dtype)
        model.to(dtype)
        expected = net(ids, mask)
        assert not expected[0].isnan().any()
        _assert_same(model(ids=ids, mask=mask), expected)


def test_finfo_in_a_tg_input_build():
    """torch.finfo / torch.iinfo of x.dtype at the top level of a tg.Input build, in Python arithmetic too."""
    torch.manual_seed(0)
    linear = nn.Linear(4, 4)

    def compute(x, m, ids):
        h = linear(x)
        low = torch.finfo(h.dtype).min
        return (h + (1.0 - m) * low, m * low, h.masked_fill(m == 0, low), torch.where(m == 0, 0.0, low) + h,
                (torch.finfo(h.dtype).max - 1000) * h / torch.finfo(h.dtype).max,
                h * torch.finfo(h.dtype).eps, torch.full((2,), -low, device=h.device),
                ids.clamp(max=torch.iinfo(ids.dtype).max // 2 ** 60))

    x, m, ids = tg.Input(shape=(4,)), tg.Input(shape=(4,), dtype=torch.long), tg.Input(shape=(4,), dtype=torch.long)
    model = tg.Model([x, m, ids], list(compute(x, m, ids)))
    xs, ms, idss = torch.randn(3, 4), _mask(3, 4), torch.randint(0, 20, (3, 4))
    for dtype in DTYPES:
        linear.to(dtype)
        model.to(dtype)
        _assert_same(model(xs.to(dtype), ms, idss), compute(xs.to(dtype), ms, idss))


def test_finfo_number_used_as_a_plain_number_is_refused():
    """float() of a dtype's number (baked in, it would not follow .to()) says what to do instead."""
    x = tg.Input(shape=(4,))
    low = torch.finfo(x.dtype).min
    assert "follows the dtype" in repr(low)
    with pytest.raises(tg.GraphBuildError, match=r"number of a dtype .* depends on the dtype"):
        float(low)
    with pytest.raises(tg.GraphBuildError, match="dtype's name depends on the dtype"):
        _ = torch.finfo(x.dtype).dtype
    with pytest.raises(TypeError, match="Expected an integer dtype; received dtype torch.float32"):
        torch.iinfo(x.dtype)
    tg.Model(x, x * 2)


def test_torch_finfo_is_torchs_own_outside_builds_and_in_other_threads():
    """The replacement is in place only during builds, and answers real dtypes with torch's own objects."""
    real = type_info._REAL["finfo"]
    x = tg.Input(shape=(4,))
    assert torch.finfo is not real  # a build is in progress
    seen = []
    worker = threading.Thread(target=lambda: seen.extend([torch.finfo, torch.finfo(torch.bfloat16)]))
    worker.start()
    worker.join()
    assert seen[0] is real  # another thread never sees the replacement
    assert type(seen[1]) is real and seen[1].min == real(torch.bfloat16).min
    assert type(torch.finfo(torch.bfloat16)) is real
    assert isinstance(seen[1], torch.finfo) and torch.finfo().eps == real().eps
    tg.Model(x, x * torch.finfo(x.dtype).tiny)
    assert torch.finfo is real and torch.iinfo is type_info._REAL["iinfo"]

    def build_and_exit():
        tg.Input(shape=(4,))  # a thread that ends in the middle of its build

    worker = threading.Thread(target=build_and_exit)
    worker.start()
    worker.join()
    gc.collect()
    assert torch.finfo is real and type(torch) is types.ModuleType


def test_torch_dynamo_imported_during_a_build_keeps_torchs_finfo():
    """torch._dynamo (imported lazily, often during a recording) records torch's own finfo as a constant
    type, so torch.compile of code calling torch.finfo works after the build."""
    code = ("import torch, torchgraph as tg\n"
            "x = tg.Input(shape=(4,))\n"
            "assert 'torch._dynamo' not in __import__('sys').modules\n"
            "import torch._dynamo.utils as utils\n"
            "assert torch.finfo not in utils.common_constant_types\n"
            "tg.Model(x, x * torch.finfo(x.dtype).min)\n"
            "assert torch.finfo in utils.common_constant_types and torch.iinfo in utils.common_constant_types\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                            cwd=pathlib.Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr[-2000:]


def test_saving_pickling_summary_and_onnx(tmp_path):
    """The recorded call survives tg.save/tg.load, pickle, deepcopy and summary; ONNX folds it to a constant."""
    import onnxruntime

    net, model = _hf_style(int_mask_output=False)
    ids, mask = torch.randint(0, 50, (3, 7)), _mask()
    expected = net(ids, mask)
    lines = []
    tg.summary(model, print_fn=lines.append)
    assert any("finfo_value" in line for line in lines)
    tg.save(model, tmp_path / "m.safetensors")
    loaded = tg.load(tmp_path / "m.safetensors")
    tg.export_onnx(model, tmp_path / "m.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    onnx_out = session.run(None, {"ids": ids.numpy(), "mask": mask.numpy()})
    for copied in (loaded, copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        _assert_same(copied(ids=ids, mask=mask), expected)
    torch.testing.assert_close(torch.from_numpy(onnx_out[0]), expected[0], atol=1e-5, rtol=1e-5)
    loaded.to(torch.bfloat16)
    _assert_same(loaded(ids=ids, mask=mask), net.to(torch.bfloat16)(ids, mask))


def test_optimize_builds_the_mask_in_the_compute_dtype():
    """tg.optimize in float32 and bfloat16: the min is the compute dtype's, so masked rows stay finite."""
    net, model = _hf_style()
    ids, mask = torch.randint(0, 50, (3, 7)), _mask()
    _assert_same(tg.optimize(model)(ids=ids, mask=mask), net(ids, mask))
    fast = tg.optimize(model, dtype=torch.bfloat16)(ids=ids, mask=mask)
    # A CPU without bf16 instructions computes in float32 (tg.optimize falls back and says so).
    eager = net.to(torch.bfloat16 if passes.bfloat16_supported()[0] else torch.float32)(ids, mask)
    assert not fast[0].isnan().any()
    torch.testing.assert_close(fast[0], eager[0].float(), atol=1e-2, rtol=1e-2)
    _assert_same(fast[1:], eager[1:])


# --------------------------------------------------------------------------------------------
# HuggingFace models (random init, tiny configs)
# --------------------------------------------------------------------------------------------

def _text_inputs(*names):
    seq = tg.Dim("seq", max=32)
    return {n: tg.Input(shape=(seq,), dtype=torch.long) for n in names}


def _check_hf(net, inputs, data, key="last_hidden_state", dtypes=DTYPES, tmp_path=None):
    model = _recorded(net, inputs)
    path = tmp_path / "model.safetensors"
    tg.save(model, path)
    loaded = tg.load(path)
    for dtype in dtypes:
        for m in (net, model, loaded):
            m.to(dtype)
        expected = getattr(net(**data), key)
        assert not expected.isnan().any()
        _assert_same([model(**data)[key], loaded(**data)[key]], [expected, expected])


def test_bert_eager_attention(tmp_path):
    """BertModel with eager attention (transformers' masking_utils): exact with a fully masked row."""
    torch.manual_seed(0)
    net = tiny_bert(vocab_size=100, hidden_size=32, intermediate_size=64, attn_implementation="eager",
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).eval()
    data = {"input_ids": torch.randint(0, 100, (3, 7)), "attention_mask": _mask()}
    _check_hf(net, _text_inputs("input_ids", "attention_mask"), data, tmp_path=tmp_path)


def test_bloom(tmp_path):
    """BloomModel (ALiBi, causal mask from masking_utils): its root forward records."""
    torch.manual_seed(0)
    data = {"input_ids": torch.randint(0, 128, (3, 7)), "attention_mask": _mask()}
    _check_hf(tiny_bloom().eval(), _text_inputs("input_ids", "attention_mask"), data, tmp_path=tmp_path)


def _t5_data():
    return {"input_ids": torch.randint(0, 128, (3, 7)), "attention_mask": _mask(),
            "decoder_input_ids": torch.randint(0, 128, (3, 5))}


def _t5_inputs():
    return {**_text_inputs("input_ids", "attention_mask"),
            "decoder_input_ids": tg.Input(shape=(tg.Dim("target", max=32),), dtype=torch.long)}


def test_t5_encoder_decoder(tmp_path):
    """T5Model records to leaf layers (its attention no longer stays opaque): exact in float32 and, built
    from a bfloat16 module, in bfloat16."""
    torch.manual_seed(0)
    _check_hf(tiny_t5().eval(), _t5_inputs(), _t5_data(), dtypes=(torch.float32,), tmp_path=tmp_path)
    torch.manual_seed(0)
    _check_hf(tiny_t5().eval().to(torch.bfloat16), _t5_inputs(), _t5_data(), dtypes=(torch.bfloat16,),
              tmp_path=tmp_path)


def test_t5_after_to_bfloat16_fails_loudly():
    """T5Model built in float32, then .to(torch.bfloat16): a known limit, and a loud one.

    T5LayerNorm branches on ``self.weight.dtype in [torch.float16, torch.bfloat16]``, a parameter's real
    dtype read in Python: the float32 build records the float32 branch, and after .to(bfloat16) the next
    Linear gets float32 activations. The model must raise (never return numbers that differ from eager's);
    recording the module after converting it is exact (test_t5_encoder_decoder)."""
    torch.manual_seed(0)
    net = tiny_t5().eval()
    model = _recorded(net, _t5_inputs())
    net.to(torch.bfloat16)
    model.to(torch.bfloat16)
    data = _t5_data()
    net(**data)  # eager bfloat16 runs
    with pytest.raises(RuntimeError, match="dtype"):
        model(**data)


def test_deberta_v2(tmp_path):
    """DebertaV2Model (masked_fill with torch.finfo(query.dtype).min in its attention)."""
    torch.manual_seed(0)
    data = {"input_ids": torch.randint(0, 128, (3, 7)), "attention_mask": _mask()}
    _check_hf(tiny_deberta_v2().eval(), _text_inputs("input_ids", "attention_mask"), data, tmp_path=tmp_path)


# --------------------------------------------------------------------------------------------
# Crafted files
# --------------------------------------------------------------------------------------------

def _craft(tmp_path, edit):
    """A saved model with finfo, its config changed by ``edit(finfo node)``."""
    x = tg.Input(shape=(4,), name="x")
    h = nn.Linear(4, 4)(x)
    path = tmp_path / "base.safetensors"
    tg.save(tg.Model(x, h * torch.finfo(h.dtype).min), path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    config = json.loads(header["__metadata__"]["config"])
    edit(next(node for node in config["nodes"] if node["target"] == "torchgraph.finfo_value"))
    header["__metadata__"]["config"] = json.dumps(config)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    out = tmp_path / "crafted.safetensors"
    out.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return out


@pytest.mark.parametrize("edit, match", [
    (lambda node: node["args"].__setitem__(1, "__class__"), r"unknown attribute '__class__'\. Expected one of bits"),
    (lambda node: node["args"].__setitem__(1, ["min"]), r"unknown attribute \['min'\]"),
    (lambda node: node["args"].__setitem__(0, {"node": "x"}), r"Expected a floating point .*; received SymbolicTensor"),
    (lambda node: node.__setitem__("target", "torchgraph.iinfo_value"), r"iinfo of torch.float32\. Expected an integer"),
    (lambda node: node["args"].pop(), r"missing 1 required positional argument"),
])
def test_crafted_config_with_bad_finfo_arguments(tmp_path, edit, match):
    """A file naming torchgraph.finfo_value with bad arguments fails with an error naming the node."""
    path = _craft(tmp_path, edit)
    with pytest.raises(ValueError, match=match) as info:
        tg.load(path)
    assert str(path) in str(info.value) and "finfo_value" in str(info.value)


def test_finfo_value_checks_its_arguments():
    """The recorded function itself: real dtypes give torch's numbers; anything else a clear error."""
    assert type_info.finfo_value(torch.bfloat16, "min") == torch.finfo(torch.bfloat16).min
    assert type_info.iinfo_value(torch.int32, "max") == 2 ** 31 - 1
    with pytest.raises(TypeError, match=r"finfo of torch.int64\. Expected a floating point"):
        type_info.finfo_value(torch.int64, "min")
    with pytest.raises(ValueError, match="unknown attribute 'mro'"):
        type_info.iinfo_value(torch.int8, "mro")

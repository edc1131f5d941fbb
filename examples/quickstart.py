"""torchgraph quick start: build a multi-input model symbolically, check it, look at it, train it on
scikit-learn's bundled digits, save and reload it, and export it to ONNX.

Run: python examples/quickstart.py   (or `bash scripts/demo.sh`, which sets everything up first)
"""

import os
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import torchgraph as tg


def build_model() -> tg.Model:
    """An image + metadata classifier: a small CNN and an MLP, joined."""
    image = tg.Input(shape=(1, 8, 8), name="image")      # the batch dim is implicit and dynamic
    meta = tg.Input(shape=(4,), name="meta")
    h = F.relu(nn.BatchNorm2d(16)(nn.Conv2d(1, 16, 3, padding=1)(image)))
    h = nn.MaxPool2d(2)(F.relu(nn.Conv2d(16, 32, 3, padding=1)(h)))
    h = h.flatten(1)                                      # any torch function or tensor method
    m = F.relu(nn.Linear(4, 16)(meta))
    joint = torch.cat([h, m], dim=1)
    print(f"  image features {h.static_shape}, meta features {m.static_shape}, joint {joint.static_shape}")
    logits = tg.name(nn.Linear(joint.shape[1], 10), "classifier")(nn.Dropout(0.2)(joint))
    return tg.Model({"image": image, "meta": meta}, logits, name="DigitNet")


def load_digits_data():
    """Digits (8x8 images, bundled with scikit-learn: no download) plus 4 quadrant means as metadata."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0   # (1797, 1, 8, 8)
    quadrants = images.unfold(2, 4, 4).unfold(3, 4, 4).mean(dim=(-1, -2)).flatten(1)  # (1797, 4)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    split = train_test_split(images, quadrants, labels, test_size=0.2, random_state=0, stratify=labels)
    x_img, t_img, x_meta, t_meta, y, t_y = split
    return {"image": x_img, "meta": x_meta}, y, {"image": t_img, "meta": t_meta}, t_y


def train(model: tg.Model):
    """model.compile / fit / evaluate, Keras style, on the digits."""
    x, y, x_test, y_test = load_digits_data()
    model.compile(optimizer=torch.optim.Adam(model.parameters(), lr=3e-3), loss="cross_entropy",
                  metrics=["accuracy"])
    start = time.perf_counter()
    model.fit(x, y, batch_size=32, epochs=12, validation_split=0.1,
              callbacks=[tg.callbacks.EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True)])
    result = model.evaluate(x_test, y_test, verbose=0)
    print(f"  test accuracy {result['accuracy']:.3f} (loss {result['loss']:.3f}), trained in "
          f"{time.perf_counter() - start:.1f} s")
    return x_test


def save_and_reload(model: tg.Model, x_test) -> None:
    """tg.save writes config + weights to one safetensors file (no pickle); tg.load rebuilds it."""
    path = os.path.join(tempfile.mkdtemp(), "digitnet.safetensors")
    tg.save(model, path)
    again = tg.load(path)
    model.eval()
    same = torch.equal(again.eval()(**x_test), model(**x_test))
    print(f"  saved {os.path.getsize(path):,} bytes to {path}; reloaded model gives identical outputs: {same}")


def show_build_time_error() -> None:
    """A wrong layer size fails at the line that makes it, before any data flows."""
    x = tg.Input(shape=(3, 32, 32))
    h = nn.Conv2d(3, 16, 3)(x)
    try:
        nn.Conv2d(32, 64, 3)(h)  # expects 32 channels, gets 16
    except tg.GraphBuildError as e:
        print(f"  GraphBuildError: {e}")


def show_picture(model: tg.Model) -> None:
    """Write out/<name>.png with tg.plot_model (needs the Graphviz `dot` program)."""
    os.makedirs("out", exist_ok=True)
    path = os.path.join("out", f"{type(model).__name__}.png")
    try:
        tg.plot_model(model, to_file=path, show_dtype=True)
        print(f"  wrote {path}")
    except (ImportError, RuntimeError) as e:  # no graphviz: the demo goes on without the picture
        print(f"  no picture: {e}")


def show_onnx_export(model) -> None:
    os.makedirs("out", exist_ok=True)
    try:
        path = tg.export_onnx(model, os.path.join("out", f"{type(model).__name__}.onnx"))
    except ImportError as e:  # onnx/onnxruntime missing: the demo goes on without the file
        print(f"  no ONNX file: {e}")
        return
    import onnx

    graph = onnx.load(path).graph
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    print(f"  wrote {path}: inputs {[(i.name, dims(i)) for i in graph.input]}, "
          f"outputs {[(o.name, dims(o)) for o in graph.output]}")


def show_optimize(model) -> None:
    """tg.optimize rewrites the graph into fused ops (no compile step) and the speed-up is measured."""
    import time

    fast = tg.optimize(model.eval())
    fused = [n.name for n in fast.graph.nodes if n.op == "call_function" and "act" in str(n.target)]
    print(f"  fused calls: {fused}")
    inputs = dict(image=torch.randn(256, 1, 8, 8), meta=torch.randn(256, 4))
    with torch.inference_mode():
        torch.testing.assert_close(fast(**inputs), model(**inputs), atol=1e-4, rtol=1e-4)
        times = {"model": [], "optimized": []}
        for _ in range(7):  # interleaved repetitions, medians: the machine may be busy
            for key, m in (("model", model), ("optimized", fast)):
                start = time.perf_counter()
                for _ in range(20):
                    m(**inputs)
                times[key].append(time.perf_counter() - start)
    base, opt = (sorted(v)[len(v) // 2] for v in times.values())
    print(f"  batch 256 forward: {base / 20 * 1e3:.2f} ms -> {opt / 20 * 1e3:.2f} ms "
          f"(speed-up {base / opt:.2f}x, same outputs)")


def main() -> None:
    torch.manual_seed(0)
    print("1. Build (shapes are checked at every call, no compute):")
    model = build_model()
    print("\n2. The result is a torch.fx.GraphModule with readable code:")
    print(model.code)
    print("3. Run it at any batch size:")
    for batch in (1, 32):
        out = model(image=torch.randn(batch, 1, 8, 8), meta=torch.randn(batch, 4))
        print(f"  batch {batch:>2}: logits {tuple(out.shape)}")
    print(f"  parameters: {sum(p.numel() for p in model.parameters()):,}; layers: "
          f"{[name for name, _ in model.named_children()]}")
    print("\n4. Mistakes are caught while building:")
    show_build_time_error()
    print("\n5. Look at it: the summary table and a picture (Graphviz):")
    model.summary()
    show_picture(model)
    print("\n6. Train it on scikit-learn's digits (model.compile / fit / evaluate):")
    x_test = train(model)
    print("\n7. Save and reload (architecture + weights, no code needed):")
    save_and_reload(model, x_test)
    print("\n8. Export to ONNX, verified in onnxruntime at two batch sizes:")
    show_onnx_export(model)
    print("\n9. Optimize for inference (fused kernels, BatchNorm folded):")
    show_optimize(model)


if __name__ == "__main__":
    main()

"""The ``torchgraph`` command line: look at, draw and export saved models.

    torchgraph info FILE                  inputs, outputs, layers, parameters, dtypes
    torchgraph summary FILE               the layer table (model.summary)
    torchgraph plot FILE -o model.svg     the graph as PNG, SVG or PDF (tg.plot_model)
    torchgraph export FILE -o model.onnx  ONNX (tg.export_onnx)
    torchgraph build-kernels              compile the C++ kernels now (else the first import does)

``FILE`` is a file written by ``tg.save``. Custom layers must be registered before a file that uses
them can be read: ``--register mypackage.layers`` imports that module first (the only code the command
runs is code you name on the command line; nothing is imported because a file says so).

Errors (missing or bad files, wrong extensions) are one line on stderr and exit status 1; usage
errors exit with 2. ``TORCHGRAPH_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import stat
import sys
from typing import Sequence

__all__ = ["main"]

_PLOT_FORMATS = (".png", ".svg", ".pdf")


class CommandError(Exception):
    """A failure to report as one line (no traceback)."""


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="torchgraph",
        description="Inspect, draw and export models saved with tg.save (safetensors files).")
    parser.add_argument("--version", action="version", version=f"torchgraph {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("file", metavar="FILE", help="a model file written by tg.save")
        p.add_argument("--register", metavar="MODULE", action="append", default=[],
                       help="import MODULE first, so the custom layers it registers with "
                            "@tg.register_layer can be loaded (repeatable)")
        p.add_argument("--max-bytes", type=int, default=None, metavar="N",
                       help="refuse files larger than N bytes (default: 16 GiB)")
        return p

    command("info", "Print the model's inputs, outputs, layers, parameter count and dtypes.")
    command("summary", "Print the model's summary table (model.summary()).")
    p = command("plot", "Draw the model's graph to a PNG, SVG or PDF file (tg.plot_model).")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="the picture to write: out.png, out.svg or out.pdf")
    p = command("export", "Export the model to ONNX (tg.export_onnx).")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the .onnx file to write")
    sub.add_parser("build-kernels", help="Compile torchgraph's C++ kernels for this machine and torch "
                   "(the first import does it otherwise); retries a build that failed before.",
                   description="Compile torchgraph's C++ kernels for this machine and torch into the "
                   "kernel cache, or check that they are there. Retries a build that failed before.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 on success)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        _run(args)
    except KeyboardInterrupt:
        print("torchgraph: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line, not a traceback
        if os.environ.get("TORCHGRAPH_DEBUG"):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, (CommandError, OSError, ValueError, TypeError, ImportError)):
            message = f"{type(exc).__name__}: {message}"
        print(f"torchgraph {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> None:
    if args.command == "build-kernels":
        _build_kernels()
        return
    output = getattr(args, "output", None)
    if args.command == "plot" and os.path.splitext(output)[1].lower() not in _PLOT_FORMATS:
        raise CommandError(f"cannot draw to '{output}': expected a .png, .svg or .pdf file name.")
    if args.command == "export" and os.path.splitext(output)[1].lower() != ".onnx":
        raise CommandError(f"cannot export to '{output}': expected a .onnx file name.")
    for module in args.register:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise CommandError(f"--register {module}: cannot import it ({exc}).") from None
    if not os.path.exists(args.file):
        raise CommandError(f"no such file: '{args.file}'.")
    # NOTE: opening a FIFO (or a device) waits for a writer or reader forever: check what paths are
    # before anything opens them.
    for path, what in ((args.file, "the model file"), (output, "the output")):
        if path is not None and os.path.exists(path) and not os.path.isdir(path) and \
                not stat.S_ISREG(os.stat(path).st_mode):
            raise CommandError(f"{what} '{path}' is not a regular file (a FIFO, socket or device).")
    if args.command == "info":
        _info(args.file, args.max_bytes)
        return
    import torchgraph as tg

    kwargs = {} if args.max_bytes is None else {"max_bytes": args.max_bytes}
    if args.command == "summary":
        model = tg.load(args.file, **kwargs)
        summary = getattr(model, "summary", None)
        if summary is None:
            raise CommandError("'summary' is not available in this version of torchgraph (Model.summary "
                               "is missing).")
        summary()
    elif args.command == "plot":
        plot_model = getattr(tg, "plot_model", None)
        if plot_model is None:
            raise CommandError("'plot' is not available in this version of torchgraph (tg.plot_model is "
                               "missing).")
        plot_model(tg.load(args.file, **kwargs), to_file=output)
        print(f"wrote {output}")
    else:
        export_onnx = getattr(tg, "export_onnx", None)
        if export_onnx is None:
            raise CommandError("'export' is not available in this version of torchgraph (tg.export_onnx "
                               "is missing).")
        export_onnx(tg.load(args.file, **kwargs), output)
        print(f"wrote {output}")


def _build_kernels() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # reported below, with the retry's outcome
        from . import _extension

    path = _extension.LIBRARY_PATH
    wanted = _extension.kernel_build()
    if path is None:
        try:
            path = _extension.build_kernels(retry_failed=True)
        except _extension.KernelsUnavailable as exc:
            raise CommandError(f"the kernels are not available: {exc}.") from None
    elif path != wanted.library:
        path = _retry_cuda_build(wanted, path)
    print(f"torchgraph kernels ({wanted.description}): {path}")


def _retry_cuda_build(wanted, fallback):
    """The CUDA build after the import fell back to the CPU-only library, built by a fresh process.

    NOTE: [Retrying the CUDA build] a process that loaded the CPU-only library cannot load the CUDA one
    (both register the same ops), so a child process imports torchgraph with the failed build forgotten:
    its import compiles and publishes it, or records the failure again."""
    import subprocess
    import time

    wanted.forget_failure()
    start = time.time()
    subprocess.run([sys.executable, "-c", "import torchgraph"], check=False)
    if not wanted.library.exists():
        compiled = wanted.log.exists() and wanted.log.stat().st_mtime >= start
        why = f"the compiler's output is in {wanted.log}" if compiled else "the warning above says why"
        raise CommandError(f"the CUDA kernels could not be built ({why}); the CPU kernels ({fallback}) "
                           "stay in use.")
    return wanted.library


def _format_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n} B"


def _info(path: str, max_bytes: int | None) -> None:
    import torch

    from .config import from_config
    from .saving import DEFAULT_MAX_BYTES, read_file_info

    info = read_file_info(path, max_bytes=DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)
    with torch.device("meta"):  # the architecture only: no memory for weights, no initialisation
        model = from_config(info.config, max_bytes=64 * 2**20)  # as tg.load's meta build
    meta = info.metadata
    lines = [f"File:        {path} ({_format_bytes(info.num_bytes)}, torchgraph format "
             f"{meta.get('format_version')}, written by torchgraph {meta.get('torchgraph_version', '?')})",
             f"Model:       {type(model).__name__}", "Inputs:"]
    for node in model.graph.nodes:
        if node.op == "placeholder":
            spec = node.meta["tg_spec"]
            lines.append(f"  {node.target:<16} {spec.format():<24} {str(spec.dtype).replace('torch.', '')}")
    lines.append("Outputs:")
    out_node = next(n for n in model.graph.nodes if n.op == "output")
    from .trees import tree_leaves

    leaves = [leaf for _, leaf in tree_leaves(out_node.args[0])]
    for name, node in zip(model.output_names, leaves):
        spec = node.meta.get("tg_spec")
        if spec is not None and spec.shape is not None:
            lines.append(f"  {name:<16} {spec.format():<24} {str(spec.dtype).replace('torch.', '')}")
        else:
            lines.append(f"  {name:<16} {'int':<24}")
    counts = collections.Counter(type(m).__name__ for m in model.layers)
    kinds = ", ".join(f"{k} x{v}" for k, v in counts.most_common())
    lines.append(f"Layers:      {len(model.layers)} ({kinds})")
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    lines.append(f"Parameters:  {total:,} ({trainable:,} trainable)")
    dtypes = collections.Counter()
    for key, (dtype, shape) in info.tensors.items():
        n = 1
        for d in shape:
            n *= d
        dtypes[str(dtype).replace("torch.", "")] += n
    lines.append("Weights:     " + (", ".join(f"{k} ({v:,} values)" for k, v in dtypes.items()) or "none")
                 + f"; {len(info.tensors)} tensors")
    lines.append(f"Mode:        {'training' if model.training else 'eval'}")
    print("\n".join(lines))

"""The `sqllm-onnx` command. Each subcommand lives in its own module, which provides
`add_arguments(parser)` and `main(args, command) -> int`; modules are imported only when used, so
`sqllm-onnx --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "quantize": ("sqllm_onnx.quantize.cli", "quantize a causal LM into a SqueezeLLM checkpoint"),
    "export": ("sqllm_onnx.export.cli", "export an ONNX decoder with SqueezeMatMul layers"),
    "eval": ("sqllm_onnx.runtime.evaluate", "perplexity of an exported model through ONNX Runtime"),
    "bench": ("sqllm_onnx.bench.cli", "benchmarks: `bench kernel` (the op) or `bench DIR` (decoding)"),
    "generate": ("sqllm_onnx.runtime.generate", "generate text with an exported model"),
    "demo": ("sqllm_onnx.demo", "export SmolLM2-135M (embedded) fp16 and quantized, evaluate and compare, offline"),
}


def build_parser(argv) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sqllm-onnx", description="SqueezeLLM for ONNX Runtime: quantize, export, evaluate and benchmark.")
    from sqllm_onnx import __version__

    parser.add_argument("--version", action="version", version=f"sqllm-onnx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Only the chosen subcommand's module is imported (torch and friends are slow to import).
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_module=mod)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    command = "sqllm-onnx " + " ".join(shlex.quote(a) for a in argv)
    try:
        return int(args._module.main(args, command) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

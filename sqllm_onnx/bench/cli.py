"""`sqllm-onnx bench kernel ...` or `sqllm-onnx bench DIR ...`."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="'kernel' for the op benchmark, or an exported model folder")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark (see --help of each)")


def main(args, command: str) -> int:
    if args.target == "kernel":
        from sqllm_onnx.bench import kernel as bench
        prog = "sqllm-onnx bench kernel"
    else:
        from sqllm_onnx.bench import decode as bench
        prog = "sqllm-onnx bench DIR"
    from sqllm_onnx.cli import Parser

    parser = Parser(prog=prog, description=bench.__doc__.split("\n")[0])
    if args.target != "kernel":
        parser.add_argument("model_dir", help="an exported folder")
    bench.add_arguments(parser)
    sub_args = parser.parse_args(([] if args.target == "kernel" else [args.target]) + args.rest)
    return bench.main(sub_args, command)

"""The `sqllm-onnx` command. Each subcommand lives in its own module, which provides
`add_arguments(parser)` and `main(args, command) -> int`; modules are imported only when used, so
`sqllm-onnx --help` stays fast.

Errors: a subcommand raises `errors.UserError` (or SystemExit with a message) for anything the user
can fix; every other exception is reported in one line too, with its type, and `--debug` (or
SQLLM_DEBUG=1) shows the traceback instead. Exit status: 0 success, 1 failure, 2 bad arguments, 130
interrupted. Output: third-party warnings and ONNX Runtime's log lines that carry nothing for the
user are filtered unless `--verbose` (or SQLLM_VERBOSE=1).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "quantize": ("sqllm_onnx.quantize.cli", "quantize a causal LM into a SqueezeLLM checkpoint"),
    "export": ("sqllm_onnx.export.cli", "export an ONNX decoder with SqueezeMatMul layers"),
    "eval": ("sqllm_onnx.runtime.evaluate", "perplexity of an exported model through ONNX Runtime"),
    "bench": ("sqllm_onnx.bench.cli", "benchmarks: `bench kernel` (the op) or `bench DIR` (decoding)"),
    "generate": ("sqllm_onnx.runtime.generate", "generate text with an exported model"),
    "check": ("sqllm_onnx.export_folder", "check an exported folder against the sizes and hashes it was written with"),
    "info": ("sqllm_onnx.info", "what the op library holds (CUDA architectures, CPU paths) and whether it runs here"),
    "demo": ("sqllm_onnx.demo", "export SmolLM2-135M (embedded) fp16 and quantized, evaluate and compare, offline"),
}
GLOBAL_FLAGS = {"--debug": "SQLLM_DEBUG", "--verbose": "SQLLM_VERBOSE"}  # accepted anywhere on the line


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default shown once: appended unless it is None/False or the help text already
    says it; descriptions kept as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS) or action.option_strings == []
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """Argument errors as one line with a pointer to --help (argparse prints the whole usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(argv) -> argparse.ArgumentParser:
    from sqllm_onnx import __version__

    parser = Parser(
        prog="sqllm-onnx", description="SqueezeLLM for ONNX Runtime: quantize, export, evaluate and benchmark.",
        epilog="global options (anywhere on the line): --debug shows tracebacks; --verbose shows third-party "
        "warnings and ONNX Runtime's log")
    parser.add_argument("--version", action="version", version=f"sqllm-onnx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    # Only the chosen subcommand's module is imported (torch and friends are slow to import).
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Formatter)
        if name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_module=mod)
    return parser


def _quiet() -> None:
    """Third-party chatter off (before transformers, torch or onnxruntime are imported)."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # the exporter's "shape inference ... type is missing" lines
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore")


def _one_line(e: BaseException) -> str:
    """An exception as one line: its message's first non-empty line, prefixed with the type unless
    it is one of ours."""
    from sqllm_onnx.errors import UserError

    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    for prefix in ("[ONNXRuntimeError] : ",):  # "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : msg"
        if text.startswith(prefix):
            text = text.split(" : ", 3)[-1]
    if isinstance(e, UserError):
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for flag, env in GLOBAL_FLAGS.items():
        if flag in argv:
            argv = [a for a in argv if a != flag]
            os.environ[env] = "1"
    debug = os.environ.get("SQLLM_DEBUG") == "1"
    if os.environ.get("SQLLM_VERBOSE") != "1":
        _quiet()
    if next((a for a in argv if a in SUBCOMMANDS), None) in ("bench", "eval", "generate"):
        # numpy's OpenBLAS threads spin after any BLAS call and take cores from ONNX Runtime's own
        # pool (measured on 2 cores: a 576x1536 SqueezeMatMul 58 us instead of 90); these commands
        # compute with ONNX Runtime only. Set before numpy is first imported.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    args = build_parser(argv).parse_args(argv)
    command = "sqllm-onnx " + " ".join(shlex.quote(a) for a in argv)
    name = f"sqllm-onnx {args.command}"
    from sqllm_onnx.errors import UsageError, UserError

    try:
        return int(args._module.main(args, command) or 0)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # subcommands' own `raise SystemExit("message")`
        if isinstance(e.code, str):
            print(f"{name}: error: {e.code}", file=sys.stderr)
            return 1
        raise
    except UsageError as e:
        if debug:
            raise
        print(f"{name}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line for the person; --debug for the traceback
        if debug:
            raise
        hint = "" if isinstance(e, UserError) else " (rerun with --debug for the traceback)"
        print(f"{name}: error: {_one_line(e)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

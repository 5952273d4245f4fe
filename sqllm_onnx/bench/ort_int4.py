"""ORT's own int4 path, as a baseline: MatMulNBits (block-wise 4-bit, RTN or HQQ) applied by
`onnxruntime.quantization` to an unquantized export of the same model. lm_head is left in fp16,
as our exports leave it, so the comparison is weights-for-weights."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import onnx

from sqllm_onnx import export_folder
from sqllm_onnx.export import configs
from sqllm_onnx.op import IR_VERSION

ALGOS = ("rtn", "hqq")


def quantize_ort_int4(src_dir: str | Path, out_dir: str | Path, algo: str = "rtn", block_size: int = 128,
                      bits: int = 4, log=print) -> Path:
    """Write `out_dir`: src_dir's export with every MatMul but lm_head as MatMulNBits."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    if algo not in ALGOS:
        raise ValueError(f"algo must be one of {ALGOS}, got {algo!r}")
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    started = time.time()
    model = onnx.load(str(src_dir / "model.onnx"))
    exclude = [n.name for n in model.graph.node if "lm_head" in n.name]
    if algo == "rtn":
        algo_config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=bits)
    else:
        algo_config = HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits)
    log(f"ORT MatMulNBits {algo.upper()} {bits}-bit, block {block_size}: {src_dir} -> {out_dir}")
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                     nodes_to_exclude=exclude, algo_config=algo_config)
    quantizer.process()
    staging = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for p in src_dir.iterdir():
            if p.is_file() and not p.name.startswith("model.onnx") and p.name != configs.MANIFEST:
                shutil.copy2(p, staging / p.name)
        proto = quantizer.model.model
        proto.ir_version = min(proto.ir_version, IR_VERSION)
        large = sum(len(t.raw_data) for t in proto.graph.initializer) > 1.8e9  # protobuf's 2 GB limit
        onnx.save(proto, str(staging / "model.onnx"), save_as_external_data=large, all_tensors_to_one_file=True,
                  location="model.onnx_data")
        manifest = json.loads((src_dir / configs.MANIFEST).read_text()) if (src_dir / configs.MANIFEST).exists() else {}
        manifest["quantization"] = {"method": f"ort-matmulnbits-{algo}", "bits": bits, "block_size": block_size,
                                    "excluded": exclude, "seconds": round(time.time() - started, 1)}
        files = [p for p in sorted(staging.iterdir()) if p.is_file()]  # this folder's files, not the source's
        manifest.update(format=export_folder.FORMAT, files={p.name: p.stat().st_size for p in files},
                        sha256={p.name: export_folder.sha256_file(p) for p in files})
        configs.write_json(staging / configs.MANIFEST, manifest)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir

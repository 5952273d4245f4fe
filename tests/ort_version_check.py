"""Run in a process whose onnxruntime is the version under test (tests/test_version_skew.py):
register the op library and run one SqueezeMatMul against the reference. Prints OK, WRONG or
REFUSED with the onnxruntime version."""

import sys, numpy as np, onnxruntime as ort
sys.path.insert(0, sys.argv[1])  # the repository, for sqllm_onnx
import sqllm_onnx
from sqllm_onnx import reference as ref
from sqllm_onnx.op import PackedLinear, make_model
rng = np.random.default_rng(0)
layer = PackedLinear(ref.pack_codes(rng.integers(0, 8, (5, 40)), 3), rng.standard_normal((5, 8)).astype(np.float32), 3, 40)
so = ort.SessionOptions()
try:
    sqllm_onnx.register(so)
except Exception as e:
    print("REFUSED", ort.__version__, str(e).splitlines()[0]); sys.exit(0)
s = ort.InferenceSession(make_model(layer).SerializeToString(), so, providers=["CPUExecutionProvider"])
A = rng.standard_normal((2, 40)).astype(np.float32)
y = s.run(None, {"A": A})[0]
ok = np.allclose(y, ref.squeeze_matmul(A, layer.qweight, layer.lut, K=40, N=5, bits=3), atol=1e-4)
print("OK" if ok else "WRONG", ort.__version__)

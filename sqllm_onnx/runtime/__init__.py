"""Running exported models with ONNX Runtime: sessions, decoding with a KV cache, evaluation."""

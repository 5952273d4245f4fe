"""A tokenizer folder for a Gemma 3 GGUF file, rebuilt as SentencePiece BPE.

    python benchmarks/gguf_bpe_tokenizer.py FILE.gguf OUT_DIR
    sqllm-onnx export --model FILE.gguf --tokenizer OUT_DIR ...

Gemma 3's tokenizer is SentencePiece BPE (GGUF `tokenizer.ggml.model` = "llama", scores = minus the
merge rank). transformers 4.57's GGUFGemmaConverter turns those scores into a Unigram model, which
then prefers short pieces: "statement" becomes "▁st" "at" "em" "ent" and the model's perplexity is
meaningless. This rebuilds it the way SentencePiece BPE models are converted elsewhere: merges from
the vocabulary, ranked by the merged piece's score; spaces become "▁", byte fallback, <bos> first.
Used for docs/results.md "A new family end to end: Gemma 3 270M".
"""
import sys

import gguf
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # GGUF token types


def main(path: str, out: str) -> None:
    reader = gguf.GGUFReader(path)

    def field(key):
        f = reader.fields[key]
        return [f.parts[i] for i in f.data]

    tokens = [bytes(p).decode("utf-8") for p in field("tokenizer.ggml.tokens")]
    scores = [float(p[0]) for p in field("tokenizer.ggml.scores")]
    types = [int(p[0]) for p in field("tokenizer.ggml.token_type")]
    bos, eos, unk, pad = (tokens[int(field(f"tokenizer.ggml.{k}_token_id")[0][0])]
                          for k in ("bos", "eos", "unknown", "padding"))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, i in vocab.items():
        if types[i] != NORMAL:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((-scores[i], vocab[left], vocab[right], left, right))
    merges.sort()
    tok = Tokenizer(BPE(vocab, [(m[3], m[4]) for m in merges], unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
                            if ty in (CONTROL, USER_DEFINED) and not t.startswith("<0x")])
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, vocab[bos])])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk,
                            pad_token=pad).save_pretrained(out)
    print(f"{out}: {len(vocab)} pieces, {len(merges)} merges")


if __name__ == "__main__":
    main(*sys.argv[1:3])

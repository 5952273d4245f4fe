"""The tokenizer of a Gemma GGUF file, rebuilt as SentencePiece BPE.

Gemma's tokenizers (1, 2 and 3) are SentencePiece BPE: GGUF stores them as `tokenizer.ggml.model` =
"llama" with each piece's score = minus its merge rank. transformers 4.57's GGUFGemmaConverter turns
those scores into a Unigram model, which then prefers short pieces ("statement" becomes "▁st" "at"
"em" "ent"), so the perplexity of a Gemma GGUF model evaluated with it is meaningless (found on Gemma 3
270M, docs/results.md). This rebuilds the tokenizer the way SentencePiece BPE models are converted
elsewhere: merges from the vocabulary (every split of a piece into two pieces), ranked by the merged
piece's score; spaces become "▁", byte fallback, <bos> first; the chat template is kept.
`models.load_model` uses it for GGUF files of the gemma architectures.
"""

from __future__ import annotations

from pathlib import Path

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # GGUF token types


def _reader(path):
    import gguf

    return gguf.GGUFReader(str(path))


def _field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else [f.parts[i] for i in f.data]


def _text(reader, key) -> str | None:
    parts = _field(reader, key)
    return None if not parts else bytes(parts[0]).decode("utf-8")


def needs_rebuild(path: str | Path) -> bool:
    """Whether transformers would convert this GGUF file's tokenizer with its (wrong) Gemma converter."""
    reader = _reader(path)
    arch = _text(reader, "general.architecture") or ""
    return arch.startswith("gemma") and _text(reader, "tokenizer.ggml.model") == "llama"


def bpe_tokenizer(path: str | Path):
    """A transformers PreTrainedTokenizerFast: the GGUF file's SentencePiece BPE tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    reader = _reader(path)
    tokens = [bytes(p).decode("utf-8") for p in _field(reader, "tokenizer.ggml.tokens")]
    scores = [float(p[0]) for p in _field(reader, "tokenizer.ggml.scores")]
    types = [int(p[0]) for p in _field(reader, "tokenizer.ggml.token_type")]

    def special(kind):
        ids = _field(reader, f"tokenizer.ggml.{kind}_token_id")
        return None if not ids else tokens[int(ids[0][0])]

    bos, eos, unk, pad = (special(k) for k in ("bos", "eos", "unknown", "padding"))
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
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, vocab[bos])])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad)
    template = _text(reader, "tokenizer.chat_template")
    if template:
        out.chat_template = template
    return out

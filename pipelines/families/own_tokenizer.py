"""A tokenizer trained from scratch on the training split (HF ``tokenizers``), for own text
modules: WordPiece or BPE, lower-cased BERT-style normalisation and pre-tokenisation, ``[PAD]``
(id 0) and ``[UNK]`` (id 1). Wrapped as a transformers ``PreTrainedTokenizerFast`` so it is saved
(``tokenizer.json``) and run like any MaaS tokenizer (ONNX variants, the bento's lean
tokenizer); versioned with the model it was trained for."""

from __future__ import annotations

from typing import Any

PAD, UNK = "[PAD]", "[UNK]"
TYPES = ("wordpiece", "bpe")


def train_tokenizer(texts: list[str], kind: str = "wordpiece", vocab_size: int = 8000,
                    min_frequency: int = 2, max_length: int = 128) -> Any:
    """A ``PreTrainedTokenizerFast`` with a ``kind`` vocabulary of at most ``vocab_size``
    tokens learnt from ``texts``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind not in TYPES:
        raise ValueError(f"tokenizer type {kind!r}: use one of {list(TYPES)}")
    special = [PAD, UNK]
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=UNK))
        trainer = trainers.WordPieceTrainer(vocab_size=int(vocab_size), special_tokens=special,
                                            min_frequency=min_frequency, show_progress=False)
        tok.decoder = decoders.WordPiece()
    else:
        tok = Tokenizer(models.BPE(unk_token=UNK))
        trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), special_tokens=special,
                                      min_frequency=min_frequency, show_progress=False)
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK,
                                   model_max_length=int(max_length))

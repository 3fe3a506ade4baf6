"""Tiny random-weight BERT and XLM-RoBERTa checkpoints, for tests where real ones (BGE, E5,
multilingual E5, BGE-Reranker) cannot be downloaded.

Each is written in the layout of a real Hugging Face repository: ``config.json``,
``model.safetensors`` under the transformers tensor names (``BertModel``/``XLMRobertaModel``
names for an embedder; ``bert.``/``roberta.`` prefixed ones and a classifier head for a
``*ForSequenceClassification`` reranker), ``tokenizer.json``, and for an embedder the
sentence-transformers files (``modules.json``, ``1_Pooling/config.json``,
``config_sentence_transformers.json``). Only the sizes differ (width 32, 2 layers, 4 heads) and
the tokenizer: a WordPiece over letters and a few words, built here with the ``tokenizers``
library in BERT's or XLM-R's conventions (``[CLS] a [SEP] b [SEP]`` with token types 0/1, or
``<s> a </s></s> b </s>``), since no real vocabulary of these models is available offline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np

Family = Literal["bert", "xlm-roberta"]
WIDTH, LAYERS, HEADS, FFN, POSITIONS = 32, 2, 4, 64, 64
WORDS = ("query", "passage", "what", "is", "the", "capital", "of", "france", "paris", "a",
         "man", "plays", "guitar", "cat", "sleeps", "stock", "market", "fell", "today")
SPECIALS: dict[Family, tuple[str, ...]] = {
    "bert": ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
    "xlm-roberta": ("<s>", "<pad>", "</s>", "<unk>", "<mask>"),
}


def config_of(family: Family, labels: int | None = None) -> dict[str, Any]:
    """The ``config.json`` of a tiny ``family`` model (a sequence classifier if ``labels``)."""
    xlmr = family == "xlm-roberta"
    name = "XLMRoberta" if xlmr else "Bert"
    config = {
        "architectures": [f"{name}ForSequenceClassification" if labels else f"{name}Model"],
        "model_type": family, "hidden_size": WIDTH, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "intermediate_size": FFN, "hidden_act": "gelu",
        # XLM-R's positions start at pad_token_id + 1 = 2: two more rows for as many tokens.
        "max_position_embeddings": POSITIONS + (2 if xlmr else 0),
        "type_vocab_size": 1 if xlmr else 2, "layer_norm_eps": 1e-5 if xlmr else 1e-12,
        "pad_token_id": 1 if xlmr else 0, "vocab_size": len(vocabulary(family)),
    }
    if labels:
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(labels)}
    return config


def vocabulary(family: Family) -> list[str]:
    """Special tokens, the words, then every letter and digit alone and as a continuation."""
    pieces = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,?!:'-")
    return [*SPECIALS[family], *WORDS, *pieces, *(f"##{p}" for p in pieces)]


def write_tokenizer(family: Family, path: Path) -> None:
    """A WordPiece ``tokenizer.json`` with ``family``'s special tokens and pair template."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    vocab = {token: i for i, token in enumerate(vocabulary(family))}
    bert = family == "bert"
    unk = "[UNK]" if bert else "<unk>"
    tokenizer = Tokenizer(WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if bert:
        tokenizer.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]),
                                                             ("[CLS]", vocab["[CLS]"]))
    else:
        tokenizer.post_processor = processors.RobertaProcessing(("</s>", vocab["</s>"]),
                                                                ("<s>", vocab["<s>"]))
    tokenizer.add_special_tokens(list(SPECIALS[family]))
    tokenizer.save(str(path))


def random_weights(config: dict[str, Any], seed: int, labels: int | None = None
                   ) -> dict[str, np.ndarray]:
    """Random float32 tensors under the transformers names of ``config``'s architecture."""
    rng = np.random.default_rng(seed)
    d = config["hidden_size"]
    xlmr = config["model_type"] == "xlm-roberta"

    def normal(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def dense(name: str, d_in: int, d_out: int) -> dict[str, np.ndarray]:
        return {f"{name}.weight": normal(d_out, d_in, scale=d_in ** -0.5),
                f"{name}.bias": normal(d_out, scale=0.05)}

    def norm(name: str) -> dict[str, np.ndarray]:
        return {f"{name}.weight": 1 + normal(d, scale=0.1), f"{name}.bias": normal(d, scale=0.05)}

    tensors = {"embeddings.word_embeddings.weight": normal(config["vocab_size"], d),
               "embeddings.position_embeddings.weight": normal(config["max_position_embeddings"], d),
               "embeddings.token_type_embeddings.weight": normal(config["type_vocab_size"], d),
               **norm("embeddings.LayerNorm")}
    for i in range(config["num_hidden_layers"]):
        layer = f"encoder.layer.{i}"
        for part in ("query", "key", "value"):
            tensors |= dense(f"{layer}.attention.self.{part}", d, d)
        tensors |= dense(f"{layer}.attention.output.dense", d, d)
        tensors |= norm(f"{layer}.attention.output.LayerNorm")
        tensors |= dense(f"{layer}.intermediate.dense", d, config["intermediate_size"])
        tensors |= dense(f"{layer}.output.dense", config["intermediate_size"], d)
        tensors |= norm(f"{layer}.output.LayerNorm")
    if not labels:
        return tensors
    prefix = "roberta." if xlmr else "bert."
    tensors = {prefix + name: value for name, value in tensors.items()}
    if xlmr:  # RobertaClassificationHead: dense + tanh + out_proj on the <s> token
        return tensors | dense("classifier.dense", d, d) | dense("classifier.out_proj", d, labels)
    return tensors | dense("bert.pooler.dense", d, d) | dense("classifier", d, labels)


def write_embedder(out_dir: Path, family: Family, *, pooling: str = "mean", normalize: bool = True,
                   prompts: dict[str, str] | None = None, default_prompt: str | None = None,
                   seed: int = 0) -> Path:
    """A tiny sentence-transformers embedder in ``out_dir``: ``pooling`` ("cls" for BGE, "mean"
    for E5, ...), a Normalize module if ``normalize``, ``prompts`` (E5: query/passage)."""
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config = config_of(family)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    save_file(random_weights(config, seed), str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    write_tokenizer(family, out_dir / "tokenizer.json")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    (out_dir / "modules.json").write_text(json.dumps(modules, indent=2))
    (out_dir / "1_Pooling").mkdir(exist_ok=True)
    modes = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens",
             "lasttoken")
    pooling_key = {"cls": "cls_token", "mean": "mean_tokens", "max": "max_tokens",
                   "lasttoken": "lasttoken"}[pooling]
    (out_dir / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": WIDTH, "include_prompt": True,
         **{f"pooling_mode_{mode}": mode == pooling_key for mode in modes}}, indent=2))
    (out_dir / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": prompts or {}, "default_prompt_name": default_prompt,
         "similarity_fn_name": "cosine"}, indent=2))
    return out_dir


def write_reranker(out_dir: Path, family: Family, seed: int = 0) -> Path:
    """A tiny one-label ``*ForSequenceClassification`` cross-encoder (BGE-Reranker's and
    ms-marco MiniLM's shape) in ``out_dir``."""
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config = config_of(family, labels=1)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    save_file(random_weights(config, seed, labels=1), str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    write_tokenizer(family, out_dir / "tokenizer.json")
    return out_dir

"""Tiny random models (BERT, GPT-2, Llama with GQA) saved as real HF folders, for fast tests.

Each folder has config.json, model.safetensors and a small byte-level BPE tokenizer trained on
shd's built-in sentences, so the CLI can load them exactly as it loads real teachers.
"""

from __future__ import annotations

from pathlib import Path

import torch

SENTENCES = Path(__file__).resolve().parents[1] / "shdcli" / "assets" / "sentences.txt"


def make_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SENTENCES.read_text().splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        cls_token="<s>", sep_token="</s>",
    )


def make_tiny(kind: str, folder: Path, layers: int = 4, heads: int = 6, kv_heads: int = 2, hidden: int = 48,
              seed: int = 0) -> Path:
    """Write a tiny random `kind` model (bert | gpt2 | llama) with its tokenizer to folder."""
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    if kind == "bert":
        config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=2 * hidden, max_position_embeddings=256, pad_token_id=0)
        model = BertModel(config)
    elif kind == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256,
                            bos_token_id=2, eos_token_id=3)
        model = GPT2LMHeadModel(config)
    elif kind == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=kv_heads, intermediate_size=2 * hidden, head_dim=hidden // heads,
                             max_position_embeddings=256, bos_token_id=2, eos_token_id=3, pad_token_id=0)
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(kind)
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_text(path: Path, paragraphs: int = 60) -> Path:
    """A small training text: the built-in sentences grouped into blank-line separated paragraphs."""
    lines = SENTENCES.read_text().splitlines()
    paras = [" ".join(lines[i:i + 4]) for i in range(0, min(len(lines), paragraphs * 4), 4)]
    path.write_text("\n\n".join(paras) + "\n")
    return path

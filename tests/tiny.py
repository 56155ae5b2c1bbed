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


# --------------------------------------------------------------------------- one tiny teacher per family
# name -> what make_family builds; "falcon*" are the three fused layouts of Falcon's query_key_value.
FAMILY_KINDS = {
    "gpt2": "causal", "gpt_neox": "causal", "phi3": "causal", "falcon": "causal", "falcon_mq": "causal",
    "falcon_mha": "causal", "llama": "causal", "mistral": "causal", "qwen2": "causal", "qwen3": "causal",
    "gemma": "causal", "gemma2": "causal", "gemma3_text": "causal", "opt": "causal",
    "bert": "encoder", "roberta": "encoder", "xlm-roberta": "encoder", "distilbert": "encoder", "electra": "encoder",
    "vit": "image", "deit": "image",
}


def family_model(name: str, vocab: int = 400, layers: int = 2, heads: int = 6, kv_heads: int = 2, hidden: int = 48,
                 seed: int = 0):
    """A tiny random model of family `name` (FAMILY_KINDS): 2 layers, 6 heads (GQA families: 2 KV heads),
    width 48, head_dim 8. Gemma-2 gets small soft caps (2.0 on attention logits, 3.0 on final logits) so
    that tanh bends the scores of random weights, and the sliding-window families a window of 4 tokens."""
    import transformers as tf

    torch.manual_seed(seed)
    d = hidden // heads
    ids = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    dec = dict(ids, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
               max_position_embeddings=256)
    gqa = dict(dec, num_key_value_heads=kv_heads, intermediate_size=2 * hidden, head_dim=d)
    if name == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads,
                                                n_positions=256, bos_token_id=2, eos_token_id=3))
    if name == "gpt_neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**dec, intermediate_size=2 * hidden, rotary_pct=0.5))
    if name == "phi3":
        return tf.Phi3ForCausalLM(tf.Phi3Config(**dec, num_key_value_heads=kv_heads, intermediate_size=2 * hidden))
    if name.startswith("falcon"):
        layout = {"falcon": dict(new_decoder_architecture=True, num_kv_heads=kv_heads, multi_query=False),
                  "falcon_mq": dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True),
                  "falcon_mha": dict(new_decoder_architecture=False, multi_query=False, parallel_attn=False,
                                     bias=True)}[name]
        return tf.FalconForCausalLM(tf.FalconConfig(**dec, ffn_hidden_size=2 * hidden, alibi=False, **layout))
    if name in ("llama", "mistral", "qwen2", "qwen3", "gemma"):
        extra = {"mistral": dict(sliding_window=4), "qwen2": {}, "qwen3": {}}.get(name, {})
        cls = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma"}[name]
        return getattr(tf, f"{cls}ForCausalLM")(getattr(tf, f"{cls}Config")(**gqa, **extra))
    if name == "gemma2":
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**gqa, query_pre_attn_scalar=d, sliding_window=4,
                                                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0))
    if name == "gemma3_text":
        types = (["sliding_attention", "full_attention"] * layers)[:layers]
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**gqa, query_pre_attn_scalar=d, sliding_window=4,
                                                        layer_types=types))
    if name == "opt":
        return tf.OPTForCausalLM(tf.OPTConfig(**dec, ffn_dim=2 * hidden, word_embed_proj_dim=hidden))
    if name in ("bert", "roberta", "xlm-roberta", "electra"):
        cls = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "electra": "Electra"}[name]
        extra = dict(embedding_size=32) if name == "electra" else {}
        config = getattr(tf, f"{cls}Config")(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                             num_attention_heads=heads, intermediate_size=2 * hidden,
                                             max_position_embeddings=256, pad_token_id=0, **extra)
        return getattr(tf, f"{cls}Model")(config)
    if name == "distilbert":
        return tf.DistilBertModel(tf.DistilBertConfig(vocab_size=vocab, dim=hidden, n_layers=layers, n_heads=heads,
                                                      hidden_dim=2 * hidden, max_position_embeddings=256,
                                                      pad_token_id=0))
    if name in ("vit", "deit"):
        cls = "ViT" if name == "vit" else "DeiT"
        config = getattr(tf, f"{cls}Config")(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                             intermediate_size=2 * hidden, image_size=8, patch_size=4, num_labels=3)
        config.architectures = [f"{cls}ForImageClassification"]
        return getattr(tf, f"{cls}ForImageClassification")(config)
    raise ValueError(name)


def save_family(name: str, folder: Path, **kwargs) -> Path:
    """family_model(name) saved as an HF folder, with the tiny tokenizer for text families."""
    model = family_model(name, **kwargs)
    folder = Path(folder)
    model.save_pretrained(folder)
    if FAMILY_KINDS[name] != "image":
        make_tokenizer().save_pretrained(folder)
    return folder


def write_image_npz(path: Path, n: int = 24, classes: int = 3, seed: int = 0) -> Path:
    """n tiny grey 6 x 6 images of `classes` labels as a .npz (x, y)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.integers(0, 60, size=(n, 6, 6)).astype(np.uint8)
    x[:, :, :2] += (y[:, None, None] * 60).astype(np.uint8)
    np.savez(path, x=x, y=y)
    return path

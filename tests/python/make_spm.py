"""Trains a small SentencePiece BPE tokenizer (byte fallback, like Llama 2 / TinyLlama / Phi-3)
with sentencepiece itself, and writes the HF tokenizer files a Phi-3-style model folder has:
tokenizer.model, tokenizer_config.json (added special tokens, chat template) and
special_tokens_map.json. Prints one JSON line with the vocabulary size.

usage: make_spm.py OUT_DIR"""
import io
import json
import os
import sys

import sentencepiece as spm

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
words = ("the quick brown fox jumps over the lazy dog while a small model learns to speak "
         "about boards, tensors, quantization and the capital of France which is Paris").split()
lines = []
for i in range(4000):
    lines.append(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) + f" {i % 97}.")
model = io.BytesIO()
spm.SentencePieceTrainer.train(
    sentence_iterator=iter(lines), model_writer=model, vocab_size=512, model_type="bpe",
    byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
    split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
    normalization_rule_name="identity", minloglevel=2)
open(os.path.join(out, "tokenizer.model"), "wb").write(model.getvalue())
sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
n = sp.get_piece_size()
added = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]
decoder = {str(i): {"content": sp.id_to_piece(i), "special": True, "normalized": False,
                    "lstrip": False, "rstrip": False, "single_word": False} for i in range(3)}
for k, tok in enumerate(added):
    decoder[str(n + k)] = {"content": tok, "special": True, "normalized": False,
                           "lstrip": False, "rstrip": True, "single_word": False}
cfg = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": False, "add_eos_token": False,
    "bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>",
    "legacy": False, "model_max_length": 2048, "sp_model_kwargs": {},
    "added_tokens_decoder": decoder,
    "chat_template": "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}",
}
json.dump(cfg, open(os.path.join(out, "tokenizer_config.json"), "w"), indent=2)
json.dump({"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>",
           "pad_token": "<|endoftext|>"}, open(os.path.join(out, "special_tokens_map.json"), "w"))
print(json.dumps({"pieces": n, "vocab": n + len(added)}))

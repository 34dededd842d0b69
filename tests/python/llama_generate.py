"""Loads a GGUF with llama.cpp (llama-cpp-python) and answers a chat prompt greedily with the
model's own chat template. Prints one JSON line: {"text": ...}."""
import json
import sys

from llama_cpp import Llama

path, question = sys.argv[1], sys.argv[2]
lora = sys.argv[3] if len(sys.argv) > 3 else None
llm = Llama(model_path=path, n_ctx=512, n_threads=2, seed=0, verbose=False, lora_path=lora)
res = llm.create_chat_completion(
    messages=[{"role": "user", "content": question}],
    temperature=0.0, top_k=1, max_tokens=48,
)
print(json.dumps({"text": res["choices"][0]["message"]["content"]}))

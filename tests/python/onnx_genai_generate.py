"""Loads an ONNX folder with onnxruntime-genai (genai_config.json, tokenizer files) and answers
a chat prompt greedily with the model's chat template, up to 48 new tokens. Prints one JSON
line: {"text": ..., "tokens": n, "ids": [...], "text16": the text of the first 16 tokens}.

usage: onnx_genai_generate.py MODEL_DIR QUESTION"""
import json
import sys

import onnxruntime_genai as og

model_dir, question = sys.argv[1], sys.argv[2]
model = og.Model(model_dir)
tok = og.Tokenizer(model)
prompt = tok.apply_chat_template(json.dumps([{"role": "user", "content": question}]),
                                 add_generation_prompt=True)
ids = tok.encode(prompt)
params = og.GeneratorParams(model)
params.set_search_options(max_length=len(ids) + 48, do_sample=False)
gen = og.Generator(model, params)
gen.append_tokens(ids)
out = []
while not gen.is_done():
    gen.generate_next_token()
    out.append(int(gen.get_next_tokens()[0]))
print(json.dumps({"text": tok.decode(out), "tokens": len(out), "ids": out,
                  "text16": tok.decode(out[:16])}))

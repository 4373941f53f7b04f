"""The same-size autoregressive baseline: a GPT-2 decoder on YAN's tokenizer and task formats."""

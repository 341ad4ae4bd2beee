"""The language-model engine: a Llama-family decoder, its weight forms, tokenizer, chat
template, slot KV cache, sampling and the continuous-batching scheduler.

See docs/generation.md for the version folder, the settings and the protocol.
"""

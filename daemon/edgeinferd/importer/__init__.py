"""``edgeinferd import``: bring a checkpoint a user already has into the model repository.

Sources: a GGUF file (llama.cpp, Ollama) or a Hugging Face model folder
(``config.json``, ``*.safetensors``, ``tokenizer.json``). Each source module
reads its format into a ``Checkpoint`` (``checkpoint.py``): the architecture's
numbers, the weights under the engine's own names, the tokenizer and the chat
template. ``write.py`` turns that into a version folder the daemon serves.

Only this package needs the ``gguf`` reader (the ``import`` extra); the daemon
never imports it.
"""

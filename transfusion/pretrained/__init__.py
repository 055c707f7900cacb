"""Start from a pretrained language model: read a local Hugging Face directory or a ``.gguf`` file
(``checkpoint.py``), map its names and layout onto ours with one adapter per architecture family (``adapters.py``),
fill ``cfg.model`` from it (``config.py``), copy its weights into the built model (``checkpoint.load_pretrained``) and
read its tokenizer (``tokenizer.py``).

Nothing here touches the network, and ``transfusion/model/`` never imports this package: the model knows only its
own names.
"""

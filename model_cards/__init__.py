"""Model-card templates (``*.md``), installed as the data-only package ``hf_glu.model_cards``.

pyproject.toml maps this top-level folder to ``hf_glu.model_cards``. This file makes it a regular package,
which an editable install's import finder can resolve (setuptools does not resolve a namespace package that
``package-dir`` maps outside its parent's folder, pypa/setuptools#4943); ``hf_glu.cards`` reads the
templates with ``importlib.resources.files("hf_glu.model_cards")``.
"""

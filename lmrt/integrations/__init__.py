"""Integrations of lmrt with other libraries. `hf`: lmrt as a Hugging Face transformers attention implementation.

Importing this package imports none of those libraries.
"""

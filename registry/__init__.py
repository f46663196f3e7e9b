"""Declarative LLM merge recipes, turned into published, documented, smoke-tested models."""

__version__ = "0.1.0"

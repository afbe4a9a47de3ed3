"""LLM Bench Shower: a self-hosted benchmark harness for large language models."""

__version__ = "0.1.0"
"""The package version (pyproject.toml's, checked by tests/test_config.py); MCP clients
see it as the server's version."""

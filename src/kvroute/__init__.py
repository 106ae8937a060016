"""kvroute: route OpenAI-style requests to the vLLM engine holding the prompt's prefix."""

__all__ = ["__version__"]

__version__ = "0.1.0"

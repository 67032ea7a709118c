"""graphserve: an OpenAI-compatible LLM server that is ready after its largest CUDA graph."""

__version__ = "0.1.0"

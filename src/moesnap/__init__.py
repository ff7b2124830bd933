"""moesnap: find where a GPU forward pass of a Mixture-of-Experts LLM goes wrong."""

__version__ = "0.1.0"

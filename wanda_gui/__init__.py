"""wanda_gui: point-and-click LLM pruning with Wanda (Sun et al. 2023)."""

__version__ = "0.1.0"

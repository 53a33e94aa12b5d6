"""alignexp: aligning language models with human preferences without reinforcement learning."""

__version__ = "0.1.0"

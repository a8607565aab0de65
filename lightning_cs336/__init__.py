"""lightning-cs336: a Lightning callback suite for LLM experiment logging, with the CS336 transformer LM."""

__version__ = "0.1.0"

"""lrft: fine-tune LLMs on frozen 4/8-bit bases with research-grade adapters."""

__version__ = "0.2.0"

"""megagpt2: GPT-2 pretraining with tensor, pipeline and ZeRO-2 data parallelism."""

__version__ = "0.1.0"

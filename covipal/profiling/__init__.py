"""Speed and memory of pruning, measured against the analytic limit (docs/profiling.md).

- :mod:`.flops`: FLOP count of one prefill (vision encoder, projector, PPM, LLM), full or pruned.
- :mod:`.shapes`: model shapes from config with random weights, and their prompts.
- :mod:`.measure`: time, peak memory and KV-cache bytes on a GPU or the CPU.
- :mod:`.bench`: every method and ratio against the unpruned model; frames that fit; a trace.
- :mod:`.report`: tables, checks, figures and the Markdown report.
- :mod:`.stage`: the ``profile`` DVC stage.
"""

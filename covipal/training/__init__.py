"""Two-stage PPM training: guide-layer targets, stage 1 (attention-guided), stage 2 (end to end).

- :mod:`.targets`: attention a deep guide layer pays each vision token, written to shards
  together with the PPM inputs (``H_v``, ``H_t``);
- :mod:`.stage1`: the PPM learns to predict those targets from the shards;
- :mod:`.stage2`: the PPM learns from the frozen LVLM's answer loss through a soft mask;
- :mod:`.ds`: the DeepSpeed engine, epoch loop, checkpoints and resume both stages share;
- :mod:`.data`: data-set rows to model inputs for the reference LVLM, data order per epoch;
- :mod:`.pipeline`: what the DVC stages ``targets``, ``stage1`` and ``stage2`` call;
- :mod:`.launch`: restarting a stage under the DeepSpeed launcher for several processes.

Nothing here is imported by ``import covipal``; deepspeed is imported only inside
:mod:`.ds`'s functions.
"""

"""The use cases, each a library function the command line calls: ``trace`` (record one forward),
``goldens`` (generate, list, show, diff, prune versions), ``check`` (our candidate against goldens:
router replay, stage-local replay), ``rereference`` (another engine's dump judged stage by stage
from its own inputs), ``calibrate`` (measure the noise floor) and ``capture`` (HF transformers'
forward as a case).

May import everything below it (gguf, model, store, judge, errors, stages, util); never the CLI.
"""

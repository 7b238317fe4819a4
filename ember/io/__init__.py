"""ember.io: the on-disk formats, in one place; train, infer and recipes all import them from here.

    safe.py         loading that never runs code: `torch.load(weights_only=True)` with one-line errors,
                    a restricted unpickler for torch DCP metadata, a DCP reader/planner built on them
"""

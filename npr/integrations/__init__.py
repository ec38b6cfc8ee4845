"""npr as the rollout engine of other RL trainers.

    npr.integrations.layout   engine outputs -> trainer tensors, the §2 mask, parallel log-probs
                              (no framework needed)
    npr.integrations.weights  trainer weights -> the engine (names and shapes checked first)
    npr.integrations.trl      TRL: make_rollout_func, ParallelGRPOTrainer, ParallelRLOOTrainer
                              (needs `pip install 'npr[trl]'`)
    npr.integrations.verl     verl / OpenRLHF: NPRRollout (BaseRollout-shaped)

Frameworks are imported lazily, only by the module that needs them.
"""

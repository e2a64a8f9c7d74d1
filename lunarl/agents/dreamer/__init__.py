"""Dreamer-style world-model agent (DreamerV3 for continuous control, entirely on device).

``world_model`` (RSSM, heads, losses), ``behavior`` (imagination actor-critic), ``agent`` (the
config, TrainState, ``train_step`` and ``AGENT``).
"""

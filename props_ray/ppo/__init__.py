"""PPO for DP-RLHF (arXiv 2310.16960): per-token rewards, advantages and losses, one prompt per row.

Everything here is computed row by row: nothing mixes the rows of a batch (no batch-level reward or
advantage whitening, no adaptive KL), so with one prompt's rollout per row a row's loss depends on
that prompt alone, which per-prompt clipping in DP-SGD needs.
"""

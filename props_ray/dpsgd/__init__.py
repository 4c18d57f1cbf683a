"""DP-SGD DPO (method ``dpsgd``): per-pair clipping with Opacus, Poisson sampling, distributed noise.

See :mod:`props_ray.dpsgd.engine` for where each part of the mechanism lives and
:mod:`props_ray.privacy.accounting` for the accounting.
"""

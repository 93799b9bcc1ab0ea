"""Pure tensor math of mlfop's optimizers: no optimizer state, each function testable alone."""

from mlfop.functional.fop import (
    FOPSystem,
    combination_coefficients,
    combine,
    euclidean_gram,
    fop_system,
    noise_shrinkage,
    solve_beta,
    step_scale,
    stream_gram_matrices,
    stream_noise,
)
from mlfop.functional.heads import check_head_layout, head_gram, split_heads
from mlfop.functional.rotation import block_layout, kronecker_statistics, merge_small_dims, rotate, unrotate
from mlfop.functional.soap import (
    adam_moments_,
    apply_update_,
    bias_corrected_step_size,
    ema_factors_,
    first_eigenbasis,
    power_iteration_basis,
    preconditioned_direction,
    refresh_bases_,
    soap_block_update_,
)

__all__ = [
    "FOPSystem",
    "check_head_layout",
    "combination_coefficients",
    "combine",
    "euclidean_gram",
    "fop_system",
    "head_gram",
    "noise_shrinkage",
    "solve_beta",
    "split_heads",
    "step_scale",
    "stream_gram_matrices",
    "stream_noise",
    "adam_moments_",
    "apply_update_",
    "bias_corrected_step_size",
    "block_layout",
    "ema_factors_",
    "first_eigenbasis",
    "kronecker_statistics",
    "merge_small_dims",
    "power_iteration_basis",
    "preconditioned_direction",
    "refresh_bases_",
    "rotate",
    "soap_block_update_",
    "unrotate",
]

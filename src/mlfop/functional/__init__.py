"""Pure tensor math of mlfop's optimizers: no optimizer state, each function testable alone.

Every function takes a batch of same-shaped blocks (a leading batch axis) and reads nothing
back to the host, except where a decomposition may fail (SOAP's refresh).
"""

from mlfop.functional.fop import (
    Combination,
    FOPSystem,
    SystemTotals,
    combination_coefficients,
    combine,
    combine_block,
    conflicts,
    fop_system,
    global_beta,
    gram_step_scale,
    noise_shrinkage,
    solve_beta,
    step_scale,
    stream_grams,
    stream_noise,
    symmetric_eigh,
)
from mlfop.functional.heads import check_head_layout, combine_heads, rotate_heads, split_heads
from mlfop.functional.rotation import block_layout, kronecker_statistics, merge_small_dims, rotate, unrotate
from mlfop.functional.soap import (
    adam_moments_,
    apply_update_,
    bias_corrected_step_size,
    ema_factors_,
    first_eigenbasis,
    power_iteration_basis,
    refresh_bases_,
    soap_denominator,
    soap_update_,
)
from mlfop.functional.streams import (
    natural_shares,
    ordered_sum,
    reach_weight,
    rescale_factor,
    rescale_mismatch,
    stream_factor_statistics,
    stream_order,
    stream_second_moment,
    stream_weights,
    update_norm_ema,
)

__all__ = [
    # the Fisher-orthogonal combination
    "Combination",
    "FOPSystem",
    "SystemTotals",
    "combination_coefficients",
    "combine",
    "combine_block",
    "conflicts",
    "fop_system",
    "global_beta",
    "gram_step_scale",
    "noise_shrinkage",
    "solve_beta",
    "step_scale",
    "stream_grams",
    "stream_noise",
    "symmetric_eigh",
    # attention heads
    "check_head_layout",
    "combine_heads",
    "rotate_heads",
    "split_heads",
    # rotations
    "block_layout",
    "kronecker_statistics",
    "merge_small_dims",
    "rotate",
    "unrotate",
    # SOAP
    "adam_moments_",
    "apply_update_",
    "bias_corrected_step_size",
    "ema_factors_",
    "first_eigenbasis",
    "power_iteration_basis",
    "refresh_bases_",
    "soap_denominator",
    "soap_update_",
    # the streams
    "natural_shares",
    "ordered_sum",
    "reach_weight",
    "rescale_factor",
    "rescale_mismatch",
    "stream_factor_statistics",
    "stream_order",
    "stream_second_moment",
    "stream_weights",
    "update_norm_ema",
]

"""The APT model: autopoietic attention, the encoder-decoder, its objective and DBC-DAC.

Importing this package imports torch; ``import apt_model`` alone does not.
"""

from apt_model.model.apt import APTModel, sinusoidal_positions
from apt_model.model.attention import AutopoieticAttention, build_mask, causal_mask
from apt_model.model.autopoietic import (
    AutopoieticTransform,
    autopoietic_probs,
    autopoietic_transform,
    batched_quantile,
    masked_softmax,
)
from apt_model.model.dbc_dac import DBCDAC, clean_nonfinite_, lowrank_project, stabilize, time_stabilize
from apt_model.model.objective import LossOutput, seq2seq_loss

__all__ = [
    "DBCDAC",
    "APTModel",
    "AutopoieticAttention",
    "AutopoieticTransform",
    "LossOutput",
    "autopoietic_probs",
    "autopoietic_transform",
    "batched_quantile",
    "build_mask",
    "causal_mask",
    "clean_nonfinite_",
    "lowrank_project",
    "masked_softmax",
    "seq2seq_loss",
    "sinusoidal_positions",
    "stabilize",
    "time_stabilize",
]

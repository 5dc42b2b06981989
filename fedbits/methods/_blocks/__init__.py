"""Block-wise training shared by ``partial`` and ``fedcybgd``: which parameters a
client trains in a round (:mod:`.subset`), how decoder layers are found
(:mod:`.layers`) and how a per-block tensor set travels in a body (:mod:`.wire`)."""

from fedbits.methods._blocks.layers import decoder_layers, layer_of
from fedbits.methods._blocks.subset import (
    BlockSchedule,
    Cohort,
    Subset,
    SubsetOptions,
    subset_from_options,
    train_only,
)
from fedbits.methods._blocks.wire import read_values, segments, write_values

__all__ = [
    "BlockSchedule",
    "Cohort",
    "Subset",
    "SubsetOptions",
    "decoder_layers",
    "layer_of",
    "read_values",
    "segments",
    "subset_from_options",
    "train_only",
    "write_values",
]

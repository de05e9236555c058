"""Feature stores: one split's region features, captions and caption -> image index.

- :mod:`itm.data.stores.base`: the :class:`FeatureStore` protocol, :class:`FeatureSplit`;
- :mod:`itm.data.stores.npy`: the public precomp layout (memory-mapped ``.npy`` + ``.txt``);
- :mod:`itm.data.stores.hdf5`: the project's ``<split>.h5`` store (h5py imported when used).

The stores import numpy (and h5py when an HDF5 file is touched), never torch or Lightning; the
datasets and DataModules (:mod:`itm.data.datamodule`, :mod:`itm.data.precomp`) read them.
"""

from itm.data.stores.base import FeatureSplit, FeatureStore, image_index
from itm.data.stores.hdf5 import H5Images, convert_split, open_h5_split, write_h5
from itm.data.stores.npy import (
    NpyImages,
    check_split_name,
    open_npy_split,
    open_positions,
    split_files,
)

__all__ = [
    "FeatureSplit",
    "FeatureStore",
    "H5Images",
    "NpyImages",
    "check_split_name",
    "convert_split",
    "image_index",
    "open_h5_split",
    "open_npy_split",
    "open_positions",
    "split_files",
    "write_h5",
]

"""Former home of the HDF5 store, kept so that ``from itm.data.h5store import ...`` works: the
code lives in :mod:`itm.data.stores.hdf5`."""

from itm.data.stores.hdf5 import (
    H5_FORMAT,
    H5_VERSION,
    H5Images,
    convert_split,
    open_h5_split,
    write_h5,
)

__all__ = ["H5_FORMAT", "H5_VERSION", "H5Images", "convert_split", "open_h5_split", "write_h5"]

"""Memory-map the arrays of an .npz archive in place (service/artifacts.py loads versions with it).

np.load(mmap_mode="r") maps .npy files but reads .npz members into memory; a member stored
uncompressed (np.savez) is a plain .npy inside the zip, so it can be mapped at its offset. Errors
are ValueError / OSError / zipfile.BadZipFile; the caller names the file.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from service.contract.catalog import is_vocab


def map_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz, each memory-mapped read-only where the member is stored
    uncompressed (np.savez), else read (np.savez_compressed); vocab arrays are small and read."""
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            key = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED or is_vocab(key):
                with z.open(info) as member:
                    arrays[key] = np.lib.format.read_array(member, allow_pickle=False)
                continue
            f.seek(info.header_offset)
            local = f.read(30)  # the local file header: name and extra field lengths at 26 and 28
            if local[:4] != b"PK\x03\x04":
                raise ValueError(f"member {info.filename}: bad local header")
            f.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little")
                   + int.from_bytes(local[28:30], "little"))
            version = np.lib.format.read_magic(f)
            header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in header:
                raise ValueError(f"member {info.filename}: .npy format {version} is not supported")
            shape, fortran, dtype = header[version](f)
            if dtype.hasobject:
                raise ValueError(f"member {info.filename} holds Python objects")
            # np.asarray: a plain ndarray view of the map (the np.memmap subclass costs on every slice)
            arrays[key] = np.asarray(np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                                               order="F" if fortran else "C")) if int(np.prod(shape)) else np.empty(shape, dtype)
    return arrays

#!/usr/bin/env python3
"""Reads and writes safetensors files with numpy alone (no `safetensors` package needed).

The format, as the Rust `safetensors` crate writes and checks it:

    bytes 0..8        n, the header length, unsigned 64-bit little-endian
    bytes 8..8+n      a UTF-8 JSON object:
                        {"NAME": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
                         "__metadata__": {"key": "string value", ...}}      (metadata optional, values strings)
                      padded with spaces so that the data starts at a multiple of 8
    bytes 8+n..       the tensors' raw little-endian bytes, row-major; data_offsets count from the start of this
                      section, and the tensors tile it exactly (no gaps, no overlaps)

bfloat16 (BF16) has no numpy type: it is read as float32 (exactly) and cannot be written.

Library use:
    tensors, meta = read("file.safetensors")          # dict name -> np.ndarray, dict str -> str
    write("file.safetensors", tensors, meta)          # meta values must be strings (json.dumps what is not)

Command line: `python3 tools/safetensors_io.py FILE...` lists the tensors (name, dtype, shape) and the metadata.
"""
import json
import os
import struct
import sys

import numpy as np

# safetensors dtype name -> numpy little-endian dtype
_TO_NUMPY = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}
_FROM_NUMPY = {np.dtype(v).newbyteorder("<") if np.dtype(v).itemsize > 1 else np.dtype(v): k for k, v in _TO_NUMPY.items()}

# A header above this size is not a real file (the Rust crate's limit is 100 MB).
_MAX_HEADER = 100_000_000


class SafetensorsError(ValueError):
    """A file that is not valid safetensors, or a tensor that cannot be written."""


def _fail(path, msg):
    raise SafetensorsError(f"{path}: {msg}")


def read_header(path):
    """Returns (header dict without __metadata__, metadata dict, data section start) of a safetensors file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            _fail(path, f"too short for a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            _fail(path, f"header length {n} does not fit the file of {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        _fail(path, f"header is not UTF-8 JSON ({e})")
    if not isinstance(header, dict):
        _fail(path, "header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        _fail(path, "__metadata__ must map strings to strings")
    return header, meta, 8 + n


def read(path, names=None):
    """Reads the tensors of a safetensors file (all, or those in `names`) as numpy arrays, and its metadata.

    Checks that every entry has a known dtype, that its byte range matches its shape, and that the ranges tile the
    data section exactly, naming the file and the tensor on any problem."""
    header, meta, start = read_header(path)
    data_len = os.path.getsize(path) - start
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            _fail(path, f"tensor {name!r}: header entry needs dtype, shape and data_offsets, got {info!r}")
        dt = info["dtype"]
        shape = info["shape"]
        begin, end = info["data_offsets"]
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            _fail(path, f"tensor {name!r}: bad shape {shape!r}")
        itemsize = 2 if dt == "BF16" else (np.dtype(_TO_NUMPY[dt]).itemsize if dt in _TO_NUMPY else None)
        if itemsize is None:
            _fail(path, f"tensor {name!r}: unsupported dtype {dt!r}")
        expect = int(np.prod(shape, dtype=np.int64)) * itemsize
        if not (0 <= begin <= end <= data_len) or end - begin != expect:
            _fail(
                path,
                f"tensor {name!r}: data_offsets [{begin}, {end}] do not hold {dt} {shape} ({expect} bytes) "
                f"inside a data section of {data_len} bytes",
            )
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            _fail(path, f"tensor {name!r}: data starts at {begin}, expected {pos} (gap or overlap)")
        pos = end
    if pos != data_len:
        _fail(path, f"the tensors cover {pos} bytes of a data section of {data_len}")
    wanted = header.keys() if names is None else names
    out = {}
    with open(path, "rb") as f:
        for name in wanted:
            if name not in header:
                _fail(path, f"no tensor {name!r}")
            info = header[name]
            begin, end = info["data_offsets"]
            f.seek(start + begin)
            buf = f.read(end - begin)
            if info["dtype"] == "BF16":
                bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
                arr = bits.view(np.float32)
            else:
                arr = np.frombuffer(buf, dtype=_TO_NUMPY[info["dtype"]]).copy()
            out[name] = arr.reshape(info["shape"])
    return out, meta


def write(path, tensors, metadata=None):
    """Writes `tensors` (name -> array-like; numpy dtypes f8 f4 f2 i8 i4 i2 i1 u8 u4 u2 u1 bool) with `metadata`
    (str -> str) to `path`, through a temporary file and a rename so that a failure leaves no truncated file."""
    arrays = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise SafetensorsError(f"{path}: bad tensor name {name!r}")
        a = np.asarray(value)
        key = a.dtype.newbyteorder("<") if a.dtype.itemsize > 1 else a.dtype
        if key not in _FROM_NUMPY:
            raise SafetensorsError(f"{path}: tensor {name!r} has dtype {a.dtype}, which safetensors_io cannot write")
        arrays[name] = np.require(a.astype(key, copy=False), requirements="C")  # keeps 0-d shapes
    header = {}
    if metadata:
        bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise SafetensorsError(f"{path}: metadata values must be strings, got {bad}")
        header["__metadata__"] = dict(metadata)
    # Larger alignments first, then by name, as the Rust crate orders them (any order is valid).
    order = sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))
    pos = 0
    for name in order:
        a = arrays[name]
        header[name] = {"dtype": _FROM_NUMPY[a.dtype], "shape": list(a.shape), "data_offsets": [pos, pos + a.nbytes]}
        pos += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            f.write(arrays[name].tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    for path in argv:
        header, meta, _ = read_header(path)
        read(path, names=[])  # validates the layout
        total = sum(int(np.prod(i["shape"], dtype=np.int64)) for i in header.values())
        print(f"{path}: {len(header)} tensors, {total} elements")
        for name in sorted(header):
            print(f"  {name}  {header[name]['dtype']}  {header[name]['shape']}")
        for k, v in meta.items():
            print(f"  metadata {k} = {v if len(v) < 400 else v[:400] + '...'}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

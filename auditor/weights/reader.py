"""Read a model's safetensors (single file or shards) one tensor at a time, in float32.

Every header is validated by ``safetensors_io.parse_header`` before ``safe_open`` sees the
file; reads are memory-mapped by safetensors itself, and only one shard is open at a time so
a 100-shard model costs one mapping, not a hundred.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open

from auditor.errors import AuditorError, MalformedSafetensors, NoWeights, WeightsError
from auditor.weights.inventory import FileInventory, classify_files
from auditor.weights.safetensors_io import (
    DEFAULT_MAX_HEADER_BYTES,
    SafetensorsHeader,
    TensorInfo,
    validate_file,
)

MAX_INDEX_BYTES = 50_000_000
ReadMode = Literal["pread", "mmap"]  # a shard index is a name -> file map; real ones are < 5 MB


class SafetensorsModel:
    """A ``TensorSource`` over validated safetensors files.

    ``files`` maps a file name (repo-relative) to its local path. ``weight_map`` is the
    shard index's map of tensor name -> file name, checked against the shard headers.
    ``read_mode``: whole tensors are read with ``preadv`` into a fresh tensor ("pread", the
    default: RSS stays at the tensors held) or through safetensors' memory map ("mmap": every
    page touched counts in RSS until the shard is closed). Row slices always use the map.
    """

    def __init__(
        self,
        files: Mapping[str, Path],
        *,
        weight_map: Mapping[str, str] | None = None,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        read_mode: ReadMode = "pread",
    ) -> None:
        if not files:
            raise NoWeights("no safetensors files to read")
        self._paths = {name: Path(p) for name, p in files.items()}
        self.headers: dict[str, SafetensorsHeader] = {}
        self._where: dict[str, tuple[str, TensorInfo]] = {}
        for fname, path in sorted(self._paths.items()):
            header = validate_file(path, max_header_bytes=max_header_bytes)
            self.headers[fname] = header
            for tname, info in header.tensors.items():
                if tname in self._where:
                    raise MalformedSafetensors(
                        f"tensor {tname!r} appears in both {self._where[tname][0]} and {fname}"
                    )
                self._where[tname] = (fname, info)
        if weight_map is not None:
            self._check_weight_map(weight_map)
        self._keys = sorted(self._where)
        self._open_name: str | None = None
        self._open_handle: Any = None
        self._fd = -1
        self.read_mode = read_mode

    def _check_weight_map(self, weight_map: Mapping[str, str]) -> None:
        for tname, fname in weight_map.items():
            found = self._where.get(tname)
            if found is None:
                raise MalformedSafetensors(
                    f"shard index lists {tname!r} in {fname} but that shard's header lacks it"
                )
            if found[0] != fname:
                raise MalformedSafetensors(
                    f"shard index lists {tname!r} in {fname} but it is stored in {found[0]}"
                )
        extra = sorted(set(self._where) - set(weight_map))
        if extra:
            raise MalformedSafetensors(
                f"shard headers hold {len(extra)} tensor(s) missing from the shard index, "
                f"e.g. {extra[0]!r}"
            )

    # --- TensorSource -------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def info(self, name: str) -> TensorInfo:
        try:
            return self._where[name][1]
        except KeyError:
            raise KeyError(name) from None

    def dtype(self, name: str) -> str:
        return self.info(name).dtype

    def _checked(self, name: str) -> tuple[str, TensorInfo]:
        fname, info = self._where[name]
        if not info.arithmetic:
            raise WeightsError(
                f"{fname}: tensor {name!r} is stored as {info.dtype}, which the auditor does not "
                "compare (quantized values need their scales)"
            )
        if self._open_name != fname:
            # One shard open at a time: a 100-shard model costs one descriptor and one mapping.
            self._close_handle()
            try:
                self._fd = os.open(self._paths[fname], os.O_RDONLY)
            except OSError as exc:
                raise MalformedSafetensors(f"{fname}: cannot open: {exc.strerror}") from None
            self._open_name = fname
        return fname, info

    def _mapped(self, name: str) -> tuple[Any, TensorInfo]:
        fname, info = self._checked(name)
        if self._open_handle is None:
            try:
                self._open_handle = safe_open(str(self._paths[fname]), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise MalformedSafetensors(
                    f"{fname}: safetensors refused the file: {exc}"
                ) from None
        return self._open_handle, info

    def get(self, name: str) -> torch.Tensor:
        if self.read_mode == "mmap":
            handle, _ = self._mapped(name)
            try:
                tensor = handle.get_tensor(name)
            except SafetensorError as exc:
                raise MalformedSafetensors(f"{self._open_name}: reading {name!r}: {exc}") from None
            # safe_open's tensor views its copy-on-write mapping: an in-place edit by the
            # caller would show in the next read, so always hand out a copy.
            return tensor.to(torch.float32, copy=True)
        buf = self.get_stored(name)
        return buf if buf.dtype == torch.float32 else buf.to(torch.float32)

    def get_stored(self, name: str) -> torch.Tensor:
        """The whole tensor in its stored dtype (bf16 stays bf16: half the memory)."""
        fname, info = self._checked(name)
        return self._pread(fname, info, 0, info.shape[0] if info.shape else 1)

    def _pread(self, fname: str, info: TensorInfo, start: int, stop: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
        # Read straight into a tensor of the stored dtype: unlike a mapping, these bytes are
        # not counted in RSS once converted, so peak memory is the tensors we hold, not the
        # file (the mapped pages of a 10 GB shard would all show in RSS). Rows of a
        # row-major tensor are contiguous bytes, so a row range is one read too.
        dt = info.dtype_info
        assert dt.torch_dtype is not None
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        row_bytes = info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0
        nbytes = (stop - start) * row_bytes if info.shape else info.nbytes
        if out is not None and out.dtype == torch.uint8 and out.dim() == 1 \
                and out.numel() >= nbytes:
            buf = out[:nbytes].view(dt.torch_dtype).view(shape)
        else:
            buf = torch.empty(shape, dtype=dt.torch_dtype)
        if nbytes:
            view = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
            offset = self.headers[fname].data_start + info.begin + start * row_bytes
            done = 0
            while done < nbytes:
                n = os.preadv(self._fd, [view[done:]], offset + done)
                if n <= 0:
                    raise MalformedSafetensors(f"{fname}: file shrank while reading {info.name!r}")
                done += n
        return buf

    def get_stored_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of dimension 0 in the stored dtype (one read)."""
        fname, info = self._checked(name)
        if not info.shape:
            raise WeightsError(f"tensor {name!r} is a scalar: it has no rows")
        start, stop = max(0, start), min(max(start, stop), info.shape[0])
        return self._pread(fname, info, start, max(start, stop))

    def read_rows_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """``get_stored_rows`` into ``out`` (a 1-D uint8 buffer), as a view of it: a caller
        reading many chunks reuses its buffers instead of page-faulting a fresh allocation
        per read. Rows larger than ``out`` come in a fresh tensor."""
        fname, info = self._checked(name)
        if not info.shape:
            raise WeightsError(f"tensor {name!r} is a scalar: it has no rows")
        start, stop = max(0, start), min(max(start, stop), info.shape[0])
        return self._pread(fname, info, start, max(start, stop), out)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if self.read_mode == "pread":
            fname, info = self._checked(name)
            if not info.shape:
                raise WeightsError(f"tensor {name!r} is a scalar: it has no rows")
            start, stop = max(0, start), min(max(start, stop), info.shape[0])
            part = self._pread(fname, info, start, max(start, stop))
            return part if part.dtype == torch.float32 else part.to(torch.float32)
        handle, info = self._mapped(name)
        if not info.shape:
            raise WeightsError(f"tensor {name!r} is a scalar: it has no rows")
        try:
            part = handle.get_slice(name)[start:stop]
        except SafetensorError as exc:
            raise MalformedSafetensors(f"{self._open_name}: reading {name!r}: {exc}") from None
        return part.to(torch.float32, copy=True)

    def _close_handle(self) -> None:
        if self._open_handle is not None:
            # Dropping the handle unmaps the file (safe_open has no explicit close).
            self._open_handle.__exit__(None, None, None)
        self._open_handle = None
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1
        self._open_name = None

    def close(self) -> None:
        self._close_handle()

    def __enter__(self) -> SafetensorsModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for header in self.headers.values():
            out.update(header.metadata)
        return out


def _local_files(paths: Mapping[str, Path] | Path) -> dict[str, Path]:
    if isinstance(paths, Mapping):
        return {str(k): Path(v) for k, v in paths.items()}
    root = Path(paths)
    if root.is_file():
        return {root.name: root}
    if not root.is_dir():
        raise NoWeights(f"{root}: no such file or folder")
    out: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith((".git/", ".cache/")):
            out[rel] = p
    return out


def _file_sizes(files: Mapping[str, Path]) -> dict[str, int]:
    sizes = {}
    for name, path in files.items():
        try:
            sizes[name] = path.stat().st_size
        except OSError:
            sizes[name] = -1  # listed but missing: reported when (if) it is needed
    return sizes


def read_shard_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` of a ``*.safetensors.index.json``, strictly checked."""
    from auditor.bounded import json_limits, load_json_file

    try:
        obj = load_json_file(path, name=path.name, limits=json_limits(max_bytes=MAX_INDEX_BYTES))
    except AuditorError as exc:
        raise MalformedSafetensors(f"unreadable shard index: {exc}") from None
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise MalformedSafetensors(f"{path.name}: 'weight_map' must map tensor names to files")
    for shard in set(weight_map.values()):
        if "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            # Shards live next to the index; anything else could point outside the repo.
            raise MalformedSafetensors(f"{path.name}: shard name {shard!r} is not a plain file")
    return dict(weight_map)


def open_model(
    paths: Mapping[str, Path] | Path,
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    read_mode: ReadMode = "pread",
) -> SafetensorsModel:
    """Open a model's safetensors weights as a ``TensorSource``.

    ``paths`` is a local folder, a single ``.safetensors`` file, or a mapping of repo-relative
    file names to local paths (what the Hub client downloads). Raises ``NoWeights`` when there
    is nothing we can read safely (no files, only pickles, only an adapter) and
    ``MalformedSafetensors`` for a bad header or shard index.
    """
    files = _local_files(paths)
    inv = classify_files(_file_sizes(files))
    chosen = select_weight_files(inv, label=_label(paths))
    weight_map: dict[str, str] | None = None
    if inv.shard_index is not None and chosen == ():
        weight_map = read_shard_index(files[inv.shard_index])
        folder = inv.shard_index.rpartition("/")[0]
        shard_files: dict[str, Path] = {}
        for shard in sorted(set(weight_map.values())):
            key = f"{folder}/{shard}" if folder else shard
            path = files.get(key)
            if path is None or not path.is_file():
                raise MalformedSafetensors(
                    f"{inv.shard_index} points at shard {shard!r}, which is missing"
                )
            shard_files[shard] = path
        return SafetensorsModel(
            shard_files,
            weight_map=weight_map,
            max_header_bytes=max_header_bytes,
            read_mode=read_mode,
        )
    for name in chosen:
        if not files[name].is_file():
            raise NoWeights(f"{name}: listed but not present locally")
    return SafetensorsModel(
        {n: files[n] for n in chosen},
        weight_map=None,
        max_header_bytes=max_header_bytes,
        read_mode=read_mode,
    )


def _label(paths: Mapping[str, Path] | Path) -> str:
    return str(paths) if isinstance(paths, Path | str) else "repo"


def select_weight_files(inv: FileInventory, *, label: str = "repo") -> tuple[str, ...]:
    """The top-level safetensors files holding the model; ``()`` means "use the shard index"."""
    if inv.shard_index is not None:
        return ()
    if "model.safetensors" in inv.safetensors:
        # Repos also shipping e.g. consolidated.safetensors duplicate the same weights.
        return ("model.safetensors",)
    if inv.safetensors:
        return inv.safetensors
    if inv.has_adapter:
        raise NoWeights(
            f"{label}: holds a PEFT adapter ({inv.adapter_weights}), not full weights; "
            "read it with auditor.weights.lora.lora_deltas"
        )
    if inv.pickles:
        shown = ", ".join(inv.pickles[:3])
        raise NoWeights(
            f"{label}: weights only in pickle formats ({shown}); they are never loaded, "
            "only scanned"
        )
    raise NoWeights(f"{label}: no weight files found")

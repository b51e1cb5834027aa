"""Image sets through Hugging Face ``datasets`` (:func:`load_hf_dataset`): a Hub id from the local cache,
``imagefolder``, parquet / arrow files, map-style or streamed (extra ``score-toolkit[datasets]``)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._warnings import caller_stacklevel
from ._options import bool_option, num_workers_option, positive_int
from .image_sets import ImageDataset
from .streaming import StreamingImageDataset
from .transforms import channels_of, make_transform, open_image


class _HFReader:
    """Rows of a map-style ``datasets.Dataset`` read on demand (the Arrow table is memory-mapped)."""

    def __init__(self, ds, image_column: str, label_column: str | None, where: str):
        self.ds, self.image_column, self.label_column, self.where = ds, image_column, label_column, where

    def __len__(self) -> int:
        return len(self.ds)

    def read(self, indices: Sequence[int]) -> list[tuple[Any, Any, str]]:
        idx = [int(i) for i in indices]
        rows = self.ds[idx]
        images = rows[self.image_column]
        labels = rows[self.label_column] if self.label_column else [None] * len(idx)
        out = []
        for i, value, label in zip(idx, images, labels):
            where = f"{self.where} row {i} (column {self.image_column!r})"
            if isinstance(value, Mapping) and value.get("path"):
                where += f", file {value['path']}"
            out.append((open_image(value, where), label, where))
        return out


_DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}

#: a streamed parquet row group larger than this (uncompressed) gives a :class:`StreamingMemoryWarning`
ROW_GROUP_WARN_BYTES = 128 * 2 ** 20


class StreamingMemoryWarning(UserWarning):
    """A streamed data file is read in pieces so large that memory follows the file, not the batch."""


def _local_parquet_files(path, data_files, data_dir) -> list[Path]:
    """The local parquet files a ``load_dataset`` call would read (files, folders, glob patterns)."""
    import glob

    found: list[Path] = []

    def add(item):
        if isinstance(item, Mapping):
            for value in item.values():
                add(value)
        elif isinstance(item, (list, tuple)):
            for value in item:
                add(value)
        elif isinstance(item, (str, os.PathLike)):
            for name in glob.glob(os.fspath(item), recursive=True) or [os.fspath(item)]:
                q = Path(name)
                if q.is_file() and q.suffix.lower() == ".parquet":
                    found.append(q)
                elif q.is_dir():
                    found.extend(sorted(q.rglob("*.parquet")))

    add(data_files)
    if data_files is None:
        add(data_dir if data_dir is not None else path)
    return found


def check_row_groups(files, limit: int | None = None, where: str = "dataset 'hf'") -> None:
    """Warn (:class:`StreamingMemoryWarning`) for every parquet file among ``files`` whose largest row group
    holds more than ``limit`` bytes (uncompressed). A stream reads parquet a row group at a time, so its
    memory follows the largest row group; a file written as one row group is read whole. The warning names
    the file and says how to rewrite it. ``limit`` defaults to :data:`ROW_GROUP_WARN_BYTES`."""
    import warnings

    limit = ROW_GROUP_WARN_BYTES if limit is None else limit

    import pyarrow.parquet as pq

    for f in files:
        try:
            meta = pq.ParquetFile(f).metadata
        except Exception:  # noqa: BLE001 -- an unreadable file is reported when the stream reads it
            continue
        if meta.num_row_groups == 0:
            continue
        sizes = [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]
        big = max(range(len(sizes)), key=sizes.__getitem__)
        if sizes[big] > limit:
            rows = meta.row_group(big).num_rows
            whole = "the whole file is one row group, so it is read whole" if meta.num_row_groups == 1 else \
                f"row group {big} of {meta.num_row_groups}"
            warnings.warn(
                f"{where}: {f}: {whole}: {rows} rows, {sizes[big] / 2 ** 20:.0f} MB uncompressed; streaming reads a "
                f"row group at a time, so memory grows with it. Rewrite the file with smaller row groups (e.g. "
                f"pyarrow.parquet.write_table(table, path, row_group_size={max(1, rows * limit // (4 * sizes[big]))}) "
                f"or datasets' Dataset.to_parquet(path, batch_size=...)); see docs/training.md",
                StreamingMemoryWarning, stacklevel=caller_stacklevel())


def load_hf_dataset(path=None, *, dataset=None, split: str = "train", data_dir=None, data_files=None,
                    config_name: str | None = None, streaming: bool = False, image_column: str = "image",
                    label_column: str | None = None, num_classes: int | None = None, image_size: int | None = None,
                    channels: int | None = None, center_crop: bool = True, random_flip: bool = False,
                    interpolation: str = "bilinear", shuffle_buffer: int = 1000, num_workers: int = 0,
                    cache_dir=None) -> ImageDataset | StreamingImageDataset:
    """An image training set through Hugging Face ``datasets`` (extra ``score-toolkit[datasets]``).

    ``path`` is what ``datasets.load_dataset`` takes: a builder (``"imagefolder"`` with ``data_dir``,
    ``"parquet"`` / ``"arrow"`` with ``data_files``), a local folder or a ``.parquet`` / ``.arrow`` file, or
    a Hub id, read from the local cache when ``HF_HUB_OFFLINE=1`` (this toolkit never downloads data itself);
    or pass a ready ``datasets.Dataset`` / ``IterableDataset`` as ``dataset``. ``streaming`` reads the data as
    a stream (never all in memory). ``image_column`` names the images; ``label_column`` optional integer
    class labels, checked against ``num_classes`` (default: the number of names of a ``ClassLabel``
    column). Transforms as :class:`ImageTransform`; without ``image_size`` all images must have one size."""
    where = "dataset 'hf'"
    transform = make_transform(where, image_size, channels, center_crop, random_flip, interpolation)
    workers = num_workers_option(num_workers, where)
    bool_option(streaming, f"{where} option streaming")
    shuffle_buffer = positive_int(shuffle_buffer, f"{where} option shuffle_buffer")
    if num_classes is not None:
        num_classes = positive_int(num_classes, f"{where} option num_classes")
    try:
        import datasets as hf
    except ImportError as err:
        raise ImportError(f"{where} needs the datasets package: pip install 'score-toolkit[datasets]'") from err
    if dataset is None:
        if path is None:
            raise ValueError(f"{where} needs the option path (a Hub id, a builder such as imagefolder or parquet, "
                             f"or a local folder or data file)")
        path = os.fspath(path)
        kwargs: dict[str, Any] = {"split": split, "streaming": streaming}
        suffix = Path(path).suffix.lower()
        if os.path.isfile(path) and suffix in _DATA_FILE_BUILDERS and data_files is None:
            kwargs["data_files"] = [path]
            builder = _DATA_FILE_BUILDERS[suffix]
        else:
            builder = path
            if data_files is not None:
                kwargs["data_files"] = data_files
        if data_dir is not None:
            if not Path(data_dir).is_dir():
                raise FileNotFoundError(f"{where}: expected a folder at data_dir {data_dir}, found nothing there")
            kwargs["data_dir"] = os.fspath(data_dir)
        if config_name is not None:
            kwargs["name"] = config_name
        if cache_dir is not None:
            kwargs["cache_dir"] = os.fspath(cache_dir)
        local_files = _local_parquet_files(path, kwargs.get("data_files"), data_dir) if streaming else []
        try:
            dataset = hf.load_dataset(builder, **kwargs)
        except (FileNotFoundError, ValueError, ConnectionError) as err:
            offline = "" if os.environ.get("HF_HUB_OFFLINE") else " (set HF_HUB_OFFLINE=1 to read Hub ids from the local cache only)"
            raise ValueError(f"{where}: cannot load {path!r} (split {split!r}) with datasets: {err}{offline}") from err
        label = f"{path!r} split {split!r}"
    else:
        label = f"{type(dataset).__name__}"
        path = getattr(dataset.info, "dataset_name", None) or "dataset"
        local_files = []
    if not isinstance(dataset, (hf.Dataset, hf.IterableDataset)):
        raise TypeError(f"{where}: expected a datasets.Dataset or IterableDataset (one split), found "
                        f"{type(dataset).__name__}")
    is_stream = isinstance(dataset, hf.IterableDataset)
    features = dataset.features
    if features is None and is_stream:
        first = next(iter(dataset.take(1)), None)
        columns = list(first) if first is not None else []
    else:
        columns = list(features)
    for option, column in (("image_column", image_column), ("label_column", label_column)):
        if column is not None and column not in columns:
            raise ValueError(f"{where} {label}: expected a column {column!r} (data option {option}), found the "
                             f"columns {columns}")
    if features is not None and isinstance(features.get(image_column), hf.Image):
        dataset = dataset.cast_column(image_column, hf.Image(decode=False))
    if label_column is not None:
        feat = features.get(label_column) if features is not None else None
        if isinstance(feat, hf.ClassLabel):
            if num_classes is not None and num_classes != feat.num_classes:
                raise ValueError(f"{where} {label}: num_classes = {num_classes} but column {label_column!r} is a "
                                 f"ClassLabel with {feat.num_classes} classes")
            num_classes = feat.num_classes
    keep = [image_column] + ([label_column] if label_column else [])
    dataset = dataset.select_columns(keep)
    where_rows = f"{where} {label}"
    if channels is None:
        if is_stream:
            first = next(iter(dataset.take(1)), None)
            if first is None:
                raise ValueError(f"{where_rows}: the stream holds no examples")
            value = first[image_column]
        else:
            if len(dataset) == 0:
                raise ValueError(f"{where_rows}: the split holds no examples")
            value = dataset[0][image_column]
        transform = dataclasses.replace(transform, channels=channels_of(open_image(value, f"{where_rows} row 0")))
    size = transform.image_size
    mode = "L" if transform.channels == 1 else "RGB"
    hub_id = path if isinstance(path, str) and path.count("/") == 1 and not os.path.exists(path) else None
    options = {"path": path if isinstance(path, str) else None, "split": split, "streaming": is_stream,
               "image_column": image_column, "label_column": label_column, "image_size": size,
               "channels": transform.channels, "random_flip": random_flip}
    common = {"name": "hf", "options": options, "hub_id": hub_id, "label_column": label_column,
              "num_classes": num_classes, "num_workers": workers}
    if is_stream:
        if local_files:
            check_row_groups(local_files, where=where)
        return StreamingImageDataset(
            dataset, transform, image_column=image_column, shuffle_buffer=shuffle_buffer, where=where_rows,
            description=f"{path} ({split}, streamed; {f'{size}x{size}' if size else 'as stored'}, {mode})", **common)
    if len(dataset) == 0:
        raise ValueError(f"{where_rows}: the split holds no examples")
    return ImageDataset(_HFReader(dataset, image_column, label_column, where_rows), transform,
                        description=f"{len(dataset)} images of {path} ({split}; {f'{size}x{size}' if size else 'as stored'}, {mode})",
                        **common)

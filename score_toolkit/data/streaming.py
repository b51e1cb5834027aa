"""Image sets read as a stream (:class:`StreamingImageDataset`, a streaming ``datasets.IterableDataset``) and
the DataLoader dataset that cuts this process's micro-batches out of the stream."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch

from .image_sets import LazyImageSet
from .order import example_key
from .transforms import ImageTransform, open_image


class StreamingImageDataset(LazyImageSet):
    """An image training set read as a stream (a streaming ``datasets.IterableDataset``): nothing but a
    shuffle buffer of encoded images and the parquet row group being read are held in memory, whatever the
    size of the data. It has no ``len()``.

    Memory: parquet files are split into one shard per row group (``IterableDataset.reshard``) and the shuffle
    buffer is fed from one shard at a time (``max_buffer_input_shards=1``). Without this, pyarrow's scanner
    (which ``datasets`` reads parquet with) reads the remaining row groups of a file ahead in background
    threads while the training loop is slower than the reader: memory grew with the file (a 634 MB file
    took 1.7 GB). Memory is now bounded by the largest row group (see :func:`check_row_groups`).

    Order: the stream of epoch ``e`` is the source shuffled by ``datasets`` with seed ``seed + e`` (the order of
    the shards -- files, or row groups of parquet files -- and a buffer of ``shuffle_buffer`` examples);
    training takes consecutive examples of that stream across epochs. Every process (and every DataLoader worker) reads the whole stream and decodes only the
    examples of its own part of each global batch, so the examples of a step -- and their augmentations --
    do not depend on the number of processes or workers; reading (not decoding) costs each process the whole
    stream."""

    streaming = True

    def __init__(self, stream, transform: ImageTransform, *, image_column: str, shuffle_buffer: int, where: str,
                 **kwargs):
        if hasattr(stream, "reshard"):  # recent datasets: the row groups of parquet files become shards
            stream = stream.reshard()
        self.stream, self.image_column, self.shuffle_buffer, self.where = stream, image_column, shuffle_buffer, where
        first = next(stream_rows(self.stream.take(1)), None)
        if first is None:
            raise ValueError(f"{where}: the stream holds no examples")
        super().__init__(transform, open_image(first[image_column], f"{where} example 0"), **kwargs)

    def _item(self, row: Mapping, position: int):
        where = f"{self.where} example {position} of the stream (column {self.image_column!r})"
        value = row[self.image_column]
        if isinstance(value, Mapping) and value.get("path"):
            where += f", file {value['path']}"
        return open_image(value, where), (row[self.label_column] if self.label_column else None), where

    def shuffled(self, seed: int):
        if "max_buffer_input_shards" in inspect.signature(self.stream.shuffle).parameters:
            # one shard (file or row group) at a time: memory does not grow with the number of shards
            return self.stream.shuffle(seed=seed, buffer_size=self.shuffle_buffer, max_buffer_input_shards=1)
        return self.stream.shuffle(seed=seed, buffer_size=self.shuffle_buffer)

    def head(self, n: int) -> torch.Tensor:
        rows = list(stream_rows(self.stream.take(n)))
        return self._examples([self._item(r, i) for i, r in enumerate(rows)], None)[0]

    def draw(self, n: int, seed: int, skip: int = 0) -> torch.Tensor:
        rows = list(stream_rows(self.shuffled(seed).skip(skip).take(n)))
        return self._examples([self._item(r, skip + i) for i, r in enumerate(rows)], None)[0]

    @property
    def data(self):
        raise TypeError(f"{self.where} is streamed: it has no .data tensor (read it with training_batches or head)")


def _stream_batches_iter(source: StreamingImageDataset, seed, micro_batch, local, rank, start_micro, stop_micro,
                         worker: int, num_workers: int):
    ds = source.shuffled(seed)
    lo, hi = rank * local, (rank + 1) * local
    start_slot = start_micro * micro_batch
    slot, epoch = 0, 0
    pending: list = []
    keys: list[int] = []
    while True:
        ds.set_epoch(epoch)
        seen = 0
        for row in stream_rows(ds):
            s = slot
            slot += 1
            seen += 1
            if s < start_slot:
                continue
            mb, pos = divmod(s, micro_batch)
            if stop_micro is not None and mb >= stop_micro:
                return
            if (mb - start_micro) % num_workers != worker or not lo <= pos < hi:
                continue
            pending.append(source._item(row, s))
            keys.append(example_key(seed, s))
            if pos == hi - 1:
                yield source._examples(pending, keys)
                pending, keys = [], []
        if seen == 0:
            raise ValueError(f"{source.where}: the stream holds no examples")
        epoch += 1


def stream_rows(ds, chunk: int = 256):
    """The rows of a ``datasets.IterableDataset`` in order. ``IterableDataset.iter`` (unlike ``__iter__``)
    never splits shards between DataLoader workers: each worker sees the whole stream."""
    for batch in ds.iter(batch_size=chunk):
        columns = list(batch)
        yield from (dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns)))


def make_stream_dataset(source, seed, micro_batch, local, rank, start_micro, stop_micro):
    class _StreamBatches(torch.utils.data.IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            worker, num = (info.id, info.num_workers) if info is not None else (0, 1)
            return _stream_batches_iter(source, seed, micro_batch, local, rank, start_micro, stop_micro, worker, num)

    return _StreamBatches()

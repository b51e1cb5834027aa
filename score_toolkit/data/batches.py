"""Training batches (:func:`training_batches`) from any training set, in an order that does not depend on
the number of processes or DataLoader workers."""

from __future__ import annotations

from .base import Dataset
from .image_sets import ImageDataset
from .order import SampleOrder, example_key
from .streaming import StreamingImageDataset, make_stream_dataset


def _check_batch_layout(batch_size: int, accumulation: int, num_processes: int) -> tuple[int, int]:
    per_step = num_processes * accumulation
    if batch_size % per_step:
        raise ValueError(f"the global batch {batch_size} must divide by num_processes x gradient_accumulation_steps "
                         f"= {num_processes} x {accumulation}")
    return batch_size // accumulation, batch_size // per_step


class _MapBatches:
    """torch Dataset over (stream slot, data index) pairs: DataLoader workers read and transform images."""

    def __init__(self, source: ImageDataset, seed: int):
        self.source, self.seed = source, seed

    def __getitems__(self, items):
        slots, indices = zip(*items)
        return self.source.examples(list(indices), [example_key(self.seed, s) for s in slots])

    def __getitem__(self, item):
        return self.__getitems__([item])


class _StepSampler:
    """Batch sampler: for every step and micro-step, the (slot, index) pairs of this process."""

    def __init__(self, order: SampleOrder, batch_size, accumulation, rank, local, start_step, stop_step):
        self.order, self.batch_size, self.accumulation = order, batch_size, accumulation
        self.rank, self.local, self.start_step, self.stop_step = rank, local, start_step, stop_step

    def __iter__(self):
        micro_batch = self.batch_size // self.accumulation
        step = self.start_step
        while self.stop_step is None or step < self.stop_step:
            step += 1
            for micro in range(self.accumulation):
                first = (step - 1) * self.batch_size + micro * micro_batch + self.rank * self.local
                idx = self.order.indices(first, self.local).tolist()
                yield list(zip(range(first, first + self.local), idx))


def _collate(batch):
    return batch


def training_batches(source, *, seed: int, batch_size: int, gradient_accumulation_steps: int = 1, rank: int = 0,
                     num_processes: int = 1, start_step: int = 0, stop_step: int | None = None,
                     num_workers: int | None = None, pin_memory: bool = False):
    """This process's micro-batches for training steps ``start_step + 1, ..., stop_step`` (endless without
    ``stop_step``): an iterator of ``(x, labels)`` CPU tensors, ``gradient_accumulation_steps`` per step,
    each of ``batch_size / (num_processes * gradient_accumulation_steps)`` examples (``labels`` is None
    without a label column).

    ``batch_size`` is the global batch of a step. Step ``k`` takes slots ``(k - 1) * batch_size ...`` of the
    training stream, split into micro-batches and then between processes in rank order, so the examples of a
    step and their augmentations (:func:`example_key`) are the same for any number of processes and workers:
    map-style sets follow :class:`SampleOrder`; streamed sets their shuffled stream (see
    :class:`StreamingImageDataset`). In-memory sets (:class:`Dataset`) are sliced directly; image sets are
    read by a ``torch.utils.data.DataLoader`` with ``num_workers`` worker processes (default: the source's
    ``num_workers`` option)."""
    micro_batch, local = _check_batch_layout(batch_size, gradient_accumulation_steps, num_processes)
    workers = source.num_workers if num_workers is None else num_workers
    if isinstance(source, Dataset):
        return _tensor_batches(source, seed, batch_size, gradient_accumulation_steps, rank, local, start_step, stop_step)
    from torch.utils.data import DataLoader

    common = {"num_workers": workers, "pin_memory": pin_memory, "persistent_workers": workers > 0}
    if isinstance(source, StreamingImageDataset):
        stop_micro = None if stop_step is None else stop_step * gradient_accumulation_steps
        ds = make_stream_dataset(source, seed, micro_batch, local, rank, start_step * gradient_accumulation_steps,
                                 stop_micro)
        return iter(DataLoader(ds, batch_size=None, **common))
    if isinstance(source, ImageDataset):
        sampler = _StepSampler(SampleOrder(len(source), seed), batch_size, gradient_accumulation_steps, rank, local,
                               start_step, stop_step)
        return iter(DataLoader(_MapBatches(source, seed), batch_sampler=sampler, collate_fn=_collate, **common))
    raise TypeError(f"expected a Dataset, ImageDataset or StreamingImageDataset, found {type(source).__name__}")


def _tensor_batches(source: Dataset, seed, batch_size, accumulation, rank, local, start_step, stop_step):
    order = SampleOrder(len(source), seed)
    micro_batch = batch_size // accumulation
    step = start_step
    while stop_step is None or step < stop_step:
        step += 1
        for micro in range(accumulation):
            first = (step - 1) * batch_size + micro * micro_batch + rank * local
            idx = order.indices(first, local)
            yield source.data[idx], (source.labels[idx] if source.labels is not None else None)

"""ShardedLoader: each rank's part of every batch of an epoch, cut from one order that
every rank derives from the seed."""
import numpy as np

from cyconv.data import DataLoader


def global_batch_ends(n, global_batch, ranks, drop_last=False):
    """Where each global batch of an epoch ends in the epoch's order of ``n`` items (the
    first starts at 0).

    Batches hold ``global_batch`` items; the rest of ``n`` forms a last, smaller batch
    when it has at least one item per rank, else it joins the last full batch, so that
    every rank gets at least one item of every batch and every item is used once per
    epoch.  ``drop_last``: the rest is left out (as DataLoader's drop_last).
    """
    full, rest = divmod(n, global_batch)
    if n < ranks:
        raise ValueError(f"ShardedLoader: {n} items cannot be shared by {ranks} ranks "
                         "(each needs at least one)")
    if drop_last and full == 0:
        raise ValueError(f"ShardedLoader: with drop_last, {n} items make no batch of "
                         f"{global_batch} ({global_batch // ranks} per rank x {ranks} ranks)")
    ends = list(range(global_batch, full * global_batch + 1, global_batch))
    if rest and not drop_last:
        if rest >= ranks or not ends:
            ends.append(n)
        else:
            ends[-1] = n
    return ends


class ShardedLoader(DataLoader):
    """The batches of rank ``rank`` of ``ranks`` in a data-parallel run.

    ``batch_size`` is the number of images per rank and step: the global batch is
    ``batch_size * ranks``.  Every rank derives the same order of the data set from
    ``seed`` and the epoch (DataLoader's), cuts it into global batches
    (:func:`global_batch_ends`) and takes its part of each: the r-th of ``ranks``
    consecutive runs whose lengths differ by one at most (the first runs hold the extra
    items).  So the ranks' parts are disjoint, cover every item once per epoch, and
    every rank makes the same number of steps.  With an even split, rank r's batch k is
    images ``r * batch_size`` to ``(r + 1) * batch_size`` of one process's batch k at
    batch size ``batch_size * ranks``; each image gets the augmentation it would get
    there (it is seeded by the image's index).  Other arguments: DataLoader's.
    """

    def __init__(self, dataset, batch_size, rank, ranks, *, drop_last=False, **kwargs):
        super().__init__(dataset, batch_size, drop_last=drop_last, **kwargs)
        if isinstance(ranks, bool) or not isinstance(ranks, (int, np.integer)) or ranks < 1 \
                or isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) \
                or not 0 <= rank < ranks:
            raise ValueError(f"ShardedLoader: expected ranks >= 1 and 0 <= rank < ranks, got "
                             f"rank {rank!r} of {ranks!r}")
        self.rank, self.ranks = int(rank), int(ranks)
        self._ends = global_batch_ends(len(dataset), self.batch_size * self.ranks, self.ranks,
                                       drop_last)

    def __len__(self):
        return len(self._ends)

    def _batches(self, epoch):
        order = self._order(epoch)
        starts = [0] + self._ends[:-1]
        return [np.array_split(order[start:end], self.ranks)[self.rank]
                for start, end in zip(starts, self._ends)]

"""Data-parallel training over MPI (mpi4py; ``pip install -e ".[mpi]"`` installs it and
Open MPI).  Every rank (process) holds the whole model and trains on its part of
each batch; gradients are averaged over the ranks, so R ranks with B images each
train as one process with R * B images.  Run with a launcher::

    mpirun -n 2 python train.py

where train.py does, on every rank::

    from cyconv import distributed
    comm = distributed.init()                        # MPI.COMM_WORLD, watched
    cyconv.set_num_threads(1)                        # one core per rank, say
    model = distributed.convert_sync_batchnorm(models.small(3, 128), comm)
    loader = distributed.ShardedLoader(data, 16, comm.rank, comm.size, shuffle=True, seed=0)
    valid = distributed.ShardedLoader(valid_data, 64, comm.rank, comm.size)
    trainer = distributed.DistributedTrainer(comm, model, optimizer, loss_fn, loader, valid,
                                             epochs=30, run=RunFolder("runs/x", ...))
    trainer.fit()

The parts: :func:`init` (the :class:`Communicator`, its watchdog), :class:`DataParallel`
(rank 0's initial weights; gradients summed while backward runs),
:class:`SyncBatchNorm` and :func:`convert_sync_batchnorm` (batch statistics of the
whole batch), :class:`ShardedLoader` (each rank's part of every batch),
:class:`DistributedTrainer` and :func:`evaluate` (metrics over every rank; rank 0
writes).  docs/distributed.rst tells how it scales.  Importing this package does
not start MPI: :func:`init` does.
"""
from cyconv.distributed.comm import Communicator, RanksDisagree, init
from cyconv.distributed.data_parallel import DataParallel
from cyconv.distributed.sharding import ShardedLoader, global_batch_ends
from cyconv.distributed.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm
from cyconv.distributed.trainer import DistributedTrainer, evaluate

__all__ = ["Communicator", "DataParallel", "DistributedTrainer", "RanksDisagree", "ShardedLoader",
           "SyncBatchNorm", "convert_sync_batchnorm", "evaluate", "global_batch_ends", "init"]

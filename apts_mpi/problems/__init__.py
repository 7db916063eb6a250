"""Problems: what is learnt (data, network, objective, minibatches, per-epoch metrics).

:class:`~apts_mpi.problems.base.Problem` is the interface the training loop sees; each problem is
one module, registered in :data:`PROBLEMS` by the names of the data sets it serves.
"""

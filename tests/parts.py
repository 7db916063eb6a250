"""Test helper: one rank of an evaluation split over ``size`` ranks, without MPI."""


class PartComm:
    """One rank of ``size``: records what evaluate() would sum, returns its own part."""

    def __init__(self, rank, size):
        self.rank, self.size, self.values = rank, size, None

    def sum_scalars(self, values):
        self.values = list(values)
        return list(values)

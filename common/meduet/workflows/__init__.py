"""Workflows other than training, one module per workflow (``meduet.workflows.<stage>.<workflow>``): evaluate,
encode, extract, sample, transfer, ... Each has a typed ``Config`` (a dataclass a bundle config declares as a
component, so a wrong type is a one-line error naming the key) and ``run(config)``. Workflows take every path
from their config; none has a default path into a bundle folder."""

"""What a backend is: :class:`Backend`, the record the registry holds."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import Tensor

from ..spec import ConvSpec

__all__ = ["Backend", "BackendFn"]

BackendFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None", ConvSpec], Tensor]


@dataclasses.dataclass(frozen=True)
class Backend:
    """A registered implementation.

    ``devices``: device types it runs on (``None``: any). ``unavailable_reason``: returns ``None``
    when the backend can run on this machine, or a sentence telling the user how to make it run.
    ``supports``: returns ``None`` if the backend handles this spec, or the reason it does not.
    ``auto_ok``: whether ``auto`` should pick it for these tensors (a performance heuristic).
    ``prepare``: optionally, ``prepare(spec)`` returns ``fn(input, weight, coord_weight, bias)`` with
    the work that depends on ``spec`` alone done once (the per-call path reuses it).
    """

    name: str
    fn: BackendFn
    devices: frozenset[str] | None = None
    unavailable_reason: Callable[[], str | None] = lambda: None
    supports: Callable[[ConvSpec], str | None] = lambda spec: None
    auto_ok: Callable[[Tensor, Tensor, ConvSpec], bool] = lambda input, weight, spec: True
    prepare: Callable[[ConvSpec], Callable[..., Tensor]] | None = None

    def bind(self, spec: ConvSpec) -> Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]:
        """``fn(input, weight, coord_weight, bias)`` running this backend for ``spec``."""
        if self.prepare is not None:
            return self.prepare(spec)
        fn = self.fn
        return lambda input, weight, coord_weight, bias: fn(input, weight, coord_weight, bias, spec)

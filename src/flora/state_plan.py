"""A printable memory plan: per parameter, what the optimizer keeps and how many bytes."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Plan", "PlanRow", "format_bytes"]


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class PlanRow:
    name: str
    shape: tuple[int, ...]
    compressed: bool
    reason: str
    side: str | None
    rank: int | None
    state_bytes: int  # what this optimizer keeps for the parameter
    uncompressed_bytes: int  # what the same optimizer keeps with compression off
    adamw_bytes: int  # what torch.optim.AdamW keeps (exp_avg + exp_avg_sq)
    #: beta1^kappa * sqrt(1 + (d+1)/r) of a compressed momentum (>= 1: can grow unbounded)
    growth: float | None = None


@dataclass
class Plan:
    """Per-parameter compression decisions and exact bytes.

    For an optimizer (``label="state"``) ``state_bytes`` counts tensors held in
    ``optimizer.state`` (Python ints such as the step count are not counted); for a
    :class:`~flora.GradientAccumulator` (``label="accumulation"``) it counts the
    accumulation buffers and ``uncompressed_bytes`` plain accumulation's full-size gradients
    (``adamw_bytes`` is then 0). ``projection_cache_bytes`` is the memory of cached projections
    when ``cache_projection=True`` (zero otherwise; the paper's setting regenerates them).
    """

    optimizer: str
    rows: list[PlanRow] = field(default_factory=list)
    projection_cache_bytes: int = 0
    label: str = "state"  # what the bytes are: optimizer "state" or "accumulation" buffers

    @property
    def state_bytes(self) -> int:
        return sum(r.state_bytes for r in self.rows)

    @property
    def uncompressed_bytes(self) -> int:
        return sum(r.uncompressed_bytes for r in self.rows)

    @property
    def adamw_bytes(self) -> int:
        return sum(r.adamw_bytes for r in self.rows)

    @property
    def compressed_count(self) -> int:
        return sum(r.compressed for r in self.rows)

    def __str__(self) -> str:
        header = ("parameter", "shape", "compressed", "side", "rank", self.label, "uncompressed")
        lines = [
            (
                r.name,
                "x".join(map(str, r.shape)) or "scalar",
                (
                    "yes"
                    if r.growth is None or r.growth < 1
                    else f"yes, UNSTABLE (growth {r.growth:.2f} >= 1)"
                )
                if r.compressed
                else f"no ({r.reason})",
                r.side or "-" if r.compressed else "-",
                str(r.rank) if r.compressed else "-",
                format_bytes(r.state_bytes),
                format_bytes(r.uncompressed_bytes),
            )
            for r in self.rows
        ]
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [f"{self.optimizer} plan: {self.compressed_count}/{len(self.rows)} compressed"]
        out.append(fmt.format(*header).rstrip())
        out.extend(fmt.format(*line).rstrip() for line in lines)
        ratio = self.state_bytes / self.uncompressed_bytes if self.uncompressed_bytes else 1.0
        vs_adamw = self.state_bytes / self.adamw_bytes if self.adamw_bytes else 1.0
        total = (
            f"total {self.label} {format_bytes(self.state_bytes)} vs uncompressed "
            f"{format_bytes(self.uncompressed_bytes)} ({ratio:.3f}x)"
        )
        if self.adamw_bytes:
            total += f", vs torch AdamW {format_bytes(self.adamw_bytes)} ({vs_adamw:.3f}x)"
        out.append(total)
        if self.projection_cache_bytes:
            out.append(f"projection cache {format_bytes(self.projection_cache_bytes)}")
        return "\n".join(out)

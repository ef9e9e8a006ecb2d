"""Where a stream keeps its state under a region's data directory: the one place that
knows the layout.

```
<data_dir>/streams/<stream>/            the stream's own files (background jobs)
<data_dir>/streams/<stream>/to-<peer>/  the shipper to one peer: shipped.json, the
                                        source's own state (an index, a spool)
<data_dir>/streams/<stream>/target/     the passive side's target
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StreamPaths:
    data_dir: Path
    stream: str

    @property
    def root(self) -> Path:
        return self.data_dir / "streams" / self.stream

    def to(self, peer: str) -> Path:
        """The state of the shipper (and its source) sending to ``peer``."""
        return self.root / f"to-{peer}"

    def shipped(self, peer: str) -> Path:
        """The shipper's checkpoint: the last segment durable in ``peer``'s vault."""
        return self.to(peer) / "shipped.json"

    def shippers(self) -> list[Path]:
        """Every ``to-<peer>`` directory there is."""
        return sorted(self.root.glob("to-*"))

    @property
    def target(self) -> Path:
        return self.root / "target"

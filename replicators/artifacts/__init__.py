"""The ``artifacts`` stream kind: model checkpoints, content-defined chunks, manifests."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from replicators.artifacts.modelstore import ModelStore
    from replicators.artifacts.options import ArtifactsOptions


async def open_model_store(options: ArtifactsOptions) -> ModelStore:
    """The model store the options name (an S3 prefix when ``s3`` is set, else ``root``)."""
    if options.s3 is not None:
        from replicators.artifacts.prefix import PrefixStore

        return await PrefixStore.open(options.s3)
    from replicators.artifacts.tree import TreeStore

    return TreeStore(options.root, watch=options.watch)

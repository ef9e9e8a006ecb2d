"""The ``artifacts`` stream kind: model checkpoints, content-defined chunks, manifests."""

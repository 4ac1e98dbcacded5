"""One module per view of the explorer; each exposes ``render(ctx)``."""

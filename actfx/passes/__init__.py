"""Graph passes: capture (fx tracing), static facts, op recognition, and the compressed-save rewrite."""

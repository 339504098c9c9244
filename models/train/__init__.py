"""Training loops (one module per model) and their shared data loading."""

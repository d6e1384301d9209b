"""The pruning core: models, calibration, methods, engine, evaluation, export. Knows nothing about Gradio."""

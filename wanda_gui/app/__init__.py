"""The Gradio app: layout, callbacks, plots, chat and telemetry over the core's event stream."""

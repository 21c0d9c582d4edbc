"""What runs an exported model without PyTorch: `run_exported.py`, which `hf-fsad export` copies beside the
graph (it imports nothing of hf_fsad, so it runs with numpy, Pillow and onnxruntime or openvino alone)."""

"""What runs an exported model without PyTorch: `run_exported.py` and the file handling it shares with
`hf_fsad.io`, `image_files.py`, which `hf-fsad export` copies beside the graph (they import nothing of hf_fsad,
so they run with numpy, Pillow and onnxruntime or openvino alone)."""

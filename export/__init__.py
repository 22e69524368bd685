"""A Hugging Face model directory as a validated ONNX graph, and quantized copies of it for deployment.

``export/`` knows ONNX, onnxruntime and transformers and nothing of merging; it imports only
``lowmem_merge.errors`` from lowmerge. Modules, one job each:

  weights.py      safetensors tensors read one at a time with pread (never mapped)
  models.py       which transformers class, what the graph returns, the model built without weights
  onnx_export.py  trace on fake tensors, attach lazy weights, stream them into one external-data file
  validate.py     onnxruntime vs PyTorch on padded batches: max abs / relative error, top-1 agreement
  quantize.py     onnxruntime int8 dynamic and int4 weight-only (MatMulNBits): size, latency, agreement
  runtime.py      importing the ONNX stack, onnxruntime vs onnxruntime-gpu, sessions and latency
  memory.py       peak resident memory of one step
  pipeline.py     export -> validate -> quantize, and the JSON report beside the model
  cli.py          `lowmerge export`

Nothing heavy is imported here, so that `lowmerge --help` works without the ONNX extras.
"""

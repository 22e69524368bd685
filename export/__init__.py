"""A Hugging Face model directory as a validated ONNX graph, and quantized copies of it for deployment.

``export/`` knows ONNX, onnxruntime(-genai) and transformers and nothing of merging; from lowmerge it imports
``lowmem_merge.errors``, the reader (``lowmem_merge.io``) and ``lowmem_merge.device``. Modules, one job each:

  weights.py            the checkpoint read one tensor at a time through lowmerge's reader, by transformers' names
  models.py             which transformers class, what the graph returns, the model built without weights
  decoder.py            a decoder's shape for the generation graph, or the one line saying why not
  genai_graph.py        the generation graph op by op (GroupQueryAttention, MatMulNBits), weights streamed
  tensors.py            the external-data file written tensor by tensor; 4/8-bit block quantization
  genai_export.py       the folder for onnxruntime-genai, staged under a temporary name
  generation_check.py   greedy generation with onnxruntime-genai against transformers
  onnx_export.py        plain graph: trace on fake tensors, attach lazy weights, stream them into one data file
  validate.py           plain graph: onnxruntime vs PyTorch on padded batches
  quantize.py           plain graph: onnxruntime int8 dynamic and int4 weight-only copies
  runtime.py            importing the ONNX stack, onnxruntime vs onnxruntime-gpu, sessions and latency
  memory.py             peak resident memory of one step
  pipeline.py           export -> validate (-> quantize), and the JSON report
  cli.py                `lowmerge export`

Nothing heavy is imported here, so that `lowmerge --help` works without the ONNX extras.
"""

"""Weight-only int8 / int4 quantization of the language model and the image-token head.

* :mod:`.formats`: the number formats (quantize, dequantize, the stored layout and its sizes);
* :mod:`.kernels`: torch's weight-only matmul ops per device, their weight layouts and the load-time self-check;
* :mod:`.linear`: the ``nn.Module`` that holds a quantized weight and the choice of which layers are quantized;
* :mod:`.folder`: the quantized checkpoint folder (``janus_quantization.json`` + safetensors), written by
  streaming a source checkpoint.
"""

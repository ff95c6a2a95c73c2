"""Fused Triton kernels for decoder-only transformers: causal softmax attention, decoding against a key/value
cache, and LayerNorm and RMSNorm.

Each op is a folder whose files are its layers, read top to bottom as a call travels:

    kernels.attention(q, k, v, ...)                          kernels.layer_norm(x, ...), add_layer_norm(...)
      attention/api.py      the public functions: the softmax scale, the band, the dropout seed (dropout_mask.py:
                            the masks they apply; checks.py: the argument checks)
      attention/ops.py      the torch.library operators: allocate outputs, pick a tile, launch; the autograd
                            formula tying the forward operator to the backward one
      attention/tiles.py    the launch tables: block sizes, warps and stages per precision, head size, kernel,
                            GPU architecture and operand alignment
      attention/forward.py, backward.py, backward_programs.py, band.py, shared.py    the Triton kernels
    kernels.decode_attention(q, k_cache, v_cache, cache_seqlens, ...) travels decode/api.py, ops.py, tiles.py and
    kernels.py (its kernels run the attention forward's online softmax, from attention/shared.py)
    (layer_norm/ has the same api, ops, tiles and kernels files)

Beside them: modules.py (thin nn.Modules holding parameters: FusedMultiHeadAttention, FusedLayerNorm,
FusedRMSNorm), reference.py (the eager math the tests and benchmarks compare against), _validate.py (the input checks
every op shares), _gpu.py (the architectures the tiles are checked for, a device's own, asked once), _library.py (how a
launch becomes an operator, and the two routes a call takes to it: through the registered operators when traced by
torch.compile, around them in eager mode; the launchers' integer helpers; the operators' CPU implementation:
Triton's interpreter computes bf16 in fp32).
A change to what is computed goes in a kernel file; to speed, in a tiles file; to what users may pass, in an api
file; to autograd or torch.compile behaviour, in an ops file. tools/tiles/ (python -m tools.tiles.report) compiles
every tile the attention and LayerNorm tiles files can give, for every checked architecture, and fails on spills.

Data flow of one fused decoder block (gpt/model.py): layer_norm (ln1) -> one qkv projection -> attention on
strided (B, H, T, D) views -> projection -> add_layer_norm (its dropout and the residual add fused with ln2) ->
feed-forward -> residual add. Nothing of size T x T is stored; statistics and softmax are fp32; every backward is
deterministic.
"""

from .attention import attention, attention_dropout_mask, attention_varlen, attention_varlen_dropout_mask
from .decode import decode_attention
from .layer_norm import add_layer_norm, add_norm_dropout_mask, add_rms_norm, layer_norm, rms_norm
from .modules import FusedLayerNorm, FusedMultiHeadAttention, FusedRMSNorm

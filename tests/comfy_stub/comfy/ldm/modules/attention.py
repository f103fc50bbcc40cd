"""Stand-in of `comfy/ldm/modules/attention.py`: `wrap_attn` (verbatim semantics) and `attention_pytorch`.

`wrap_attn`: when `_inside_attn_wrapper` is not in kwargs, set it, and if
`kwargs["transformer_options"]` holds `optimized_attention_override`, return
`override(func, *args, **kwargs)` with `func` the undecorated kernel; delete the flag in `finally`.
`attention_pytorch` handles `skip_reshape` / `skip_output_reshape` and 2-D/3-D/4-D masks as upstream.
"""
from __future__ import annotations

import functools

import torch.nn.functional as F

#: every call of a kernel body (after the wrapper), for tests: (name, skip_reshape, skip_output_reshape)
KERNEL_CALLS: list[tuple[str, bool, bool]] = []


def wrap_attn(func):  # noqa: ANN001, ANN201
    @functools.wraps(func)
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        remove_attn_wrapper_key = False
        try:
            if "_inside_attn_wrapper" not in kwargs:
                transformer_options = kwargs.get("transformer_options", None)
                remove_attn_wrapper_key = True
                kwargs["_inside_attn_wrapper"] = True
                if transformer_options is not None:
                    if "optimized_attention_override" in transformer_options:
                        return transformer_options["optimized_attention_override"](func, *args, **kwargs)
            return func(*args, **kwargs)
        finally:
            if remove_attn_wrapper_key:
                del kwargs["_inside_attn_wrapper"]
    return wrapper


@wrap_attn
def attention_pytorch(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,  # noqa: ANN001, ANN201
                      skip_output_reshape=False, **kwargs):
    KERNEL_CALLS.append(("pytorch", bool(skip_reshape), bool(skip_output_reshape)))
    if skip_reshape:
        b, _, _, dim_head = q.shape
    else:
        b, _, dim_head = q.shape
        dim_head //= heads
        q, k, v = (t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    if not skip_output_reshape:
        out = out.transpose(1, 2).reshape(b, -1, heads * dim_head)
    return out


optimized_attention = attention_pytorch

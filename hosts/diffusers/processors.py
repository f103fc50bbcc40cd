"""Per-layer attention processors: wrap the ORIGINAL diffusers processor, intercept its attention call.

Why wrap instead of re-implementing FluxAttnProcessor, Flux2AttnProcessor, ... : everything around
the attention call (fused or split projections, QK norms, RoPE, IP-adapter branches, tensor-parallel
head sharding, output projections) stays diffusers' own code, so a diffusers update or a processor
variant keeps working and the `host` backend is bit-identical by construction.

How the attention call is intercepted: the original processor class's `__call__` is re-bound (same
code object, same closure and defaults) to a per-layer copy of its module globals in which
`dispatch_attention_fn` is this layer's interceptor. No module attribute of diffusers is patched,
nothing is process-wide, two pipelines (or threads) do not see each other, and `torch.compile`
inlines the re-bound function like any other. The interceptor converts `[B, N, H, D]` to attnplug's
`[B, H, N, D]`, builds the `AttentionCall` and calls `Session.attention` with a `host_attention`
that calls diffusers' own `dispatch_attention_fn` with the processor's `_attention_backend` and
`_parallel_config` — so `set_attention_backend(...)` still picks the teacher/exact kernel. The
session call is the one `torch.compiler.disable` boundary (one graph break per attention call).

SD3's `JointAttnProcessor2_0` bypasses the dispatcher: it calls `F.scaled_dot_product_attention`
on `[B, H, N, D]` ordered [image, text]. Its re-bound `__call__` sees a per-layer `F` whose
`scaled_dot_product_attention` reorders to [text, image] for attnplug and back for the host.

Under diffusers' context parallelism (ring or Ulysses) the processor sees this rank's slice of the sequence: the
call carries a `core.shard.SequenceShard` (`parallel.py`) and the session serves it with a backend that supports
sequence parallelism (ttr, landmark) or with the host's distributed kernel.
Calls that attnplug cannot serve faithfully go straight to the host attention, counted per layer
(`LayerState.passthrough`) and logged once: tensor parallelism, a context-parallel layout that does not add up,
causal/dropout/custom-scale calls, cross-attention (query and key lengths differ, e.g. an
IP-adapter branch), token counts that do not add up, and masked SD3 calls.
"""

from __future__ import annotations

import inspect
import math
import types
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ...core import AttentionCall
from ...core.shard import SequenceShard
from .layout import ModelLayout
from .parallel import context_shard

if TYPE_CHECKING:
    from ...core import Session
    from .tracking import StepState

#: Processor classes whose attention is an `F.scaled_dot_product_attention` on [image, text].
SDPA_IMAGE_FIRST = frozenset({"JointAttnProcessor2_0"})


class LayerState:
    """One layer's identity, its link to the session, and the token split of the call in flight.

    Holds no reference to the wrapper processor, so wrapper → re-bound function → globals →
    interceptor → state creates no reference cycle.
    """

    def __init__(
        self,
        session: Session,
        step: StepState,
        layout: ModelLayout,
        module_path: str,
        layer_key: str,
        block_type: str,
        block_index: int,
        host_dispatch: Callable[..., torch.Tensor] | None,
        host_sdpa: Callable[..., torch.Tensor] | None,
    ) -> None:
        self.session = session
        self.step = step
        self.layout = layout
        self.module_path = module_path
        self.layer_key = layer_key
        self.block_type = block_type
        self.block_index = block_index
        self.host_dispatch = host_dispatch
        self.host_sdpa = host_sdpa
        self.n_img_arg: int | None = None  # hidden_states length the processor received
        self.n_txt_arg: int | None = (
            None  # encoder_hidden_states length the processor received (None: not given)
        )
        self.passthrough: Counter[str] = Counter()
        self.active = True
        self._cached: tuple[tuple[Any, ...], AttentionCall] | None = None
        self._shard: tuple[tuple[Any, ...], SequenceShard | str] | None = None

    def split(self, n_tokens: int) -> tuple[int, int] | str:
        """`(n_cond, n_image)` for a joint sequence of `n_tokens`, or the reason it does not add up."""
        n_txt = self.n_txt_arg
        if n_txt is None and self.layout.single_stream_text and self.block_type == "single":
            n_txt = self.step.n_txt  # single-stream blocks: text length from the transformer's arguments
        if n_txt is None:
            n_txt = 0
            if self.n_img_arg is not None and self.n_img_arg != n_tokens:
                return f"{n_tokens} tokens but the processor got {self.n_img_arg} hidden states and no text"
        elif self.n_txt_arg is not None and self.n_img_arg is not None and n_txt + self.n_img_arg != n_tokens:
            return (
                f"{n_tokens} tokens but the processor got {n_txt} text + {self.n_img_arg} image hidden states"
            )
        if n_txt > n_tokens:
            return f"{n_tokens} tokens but the transformer got {n_txt} text tokens"
        if n_txt > 0 and self.layout.text_first is None:
            return (0, 0)  # token order unknown for this model: report no split rather than guess one
        return n_txt, n_tokens - n_txt

    def shard_for(self, parallel_config: Any, n_tokens: int) -> SequenceShard | str:
        """This call's slice of the sequence under diffusers' context parallelism, or why none (cached per
        transformer call)."""
        st = self.step
        key = (st.version, id(parallel_config), n_tokens, self.n_txt_arg)
        if self._shard is None or self._shard[0] != key:
            self._shard = (key, context_shard(parallel_config, st.n_txt, st.latent_grid, n_tokens, self.n_txt_arg))
        return self._shard[1]

    def call_for(self, n_cond: int, n_image: int, shard: SequenceShard | None = None) -> AttentionCall:
        """The `AttentionCall` of this layer for the transformer call in flight (cached per call)."""
        st = self.step
        key = (st.version, n_cond, n_image, shard)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        call = AttentionCall(
            layer_key=self.layer_key,
            block_type=self.block_type,  # type: ignore[arg-type]
            block_index=self.block_index,
            sigma=st.sigma,
            step_index=st.step_index,
            num_steps=st.num_steps,
            cond=st.cond,
            cfg_scale=st.cfg_scale,
            n_cond_tokens=n_cond,
            n_image_tokens=n_image,
            latent_grid=st.latent_grid,
            host="diffusers",
            shard=shard,
        )
        self._cached = (key, call)
        return call

    def skip(self, reason: str) -> None:
        self.passthrough[reason] += 1
        self.session.warn_once(
            self.layer_key,
            f"diffusers-passthrough:{reason}",
            f"{self.layer_key} ({self.module_path}): host attention, not attnplug: {reason}",
        )


# ---- the interceptors --------------------------------------------------------------------------------


def make_dispatch(state: LayerState) -> Callable[..., torch.Tensor]:
    """This layer's stand-in for diffusers' `dispatch_attention_fn` (same signature)."""

    def dispatch_attention_fn(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        attention_kwargs: dict[str, Any] | None = None,
        *,
        backend: Any = None,
        parallel_config: Any = None,
    ) -> torch.Tensor:
        return _route_dispatch(
            state,
            query,
            key,
            value,
            attn_mask,
            dropout_p,
            is_causal,
            scale,
            enable_gqa,
            attention_kwargs,
            backend,
            parallel_config,
        )

    return dispatch_attention_fn


@torch.compiler.disable
def _route_dispatch(
    state: LayerState,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    attention_kwargs: dict[str, Any] | None,
    backend: Any,
    parallel_config: Any,
) -> torch.Tensor:
    host = state.host_dispatch
    assert host is not None

    def host_nhd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        return host(
            q,
            k,
            v,
            attn_mask=m,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
            attention_kwargs=attention_kwargs,
            backend=backend,
            parallel_config=parallel_config,
        )

    reason = _unsupported(state, query, key, dropout_p, is_causal, scale, enable_gqa)
    shard = None
    if reason is None and parallel_config is not None:  # context parallelism: this rank's slice (parallel.py)
        found = state.shard_for(parallel_config, int(query.shape[1]))
        reason, shard = (found, None) if isinstance(found, str) else (None, found)
    split: tuple[int, int] | str = reason if reason is not None else (
        state.split(int(query.shape[1])) if shard is None else (shard.cond_sizes[shard.rank],
                                                                 shard.image_sizes[shard.rank]))
    if isinstance(split, str):
        state.skip(split)
        return host_nhd(query, key, value, attn_mask)

    def host_attention(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor | None
    ) -> torch.Tensor:
        return host_nhd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), m).transpose(1, 2)

    call = state.call_for(*split, shard=shard)
    out = state.session.attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), call, attn_mask, host_attention
    )
    return out.transpose(1, 2)


def make_functional(state: LayerState) -> types.ModuleType:
    """A per-layer copy of `torch.nn.functional` whose `scaled_dot_product_attention` is intercepted."""
    shim = types.ModuleType(F.__name__, F.__doc__)
    shim.__dict__.update({k: v for k, v in vars(F).items() if not k.startswith("__")})

    def scaled_dot_product_attention(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        return _route_sdpa(state, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    shim.scaled_dot_product_attention = scaled_dot_product_attention  # type: ignore[attr-defined]
    return shim


@torch.compiler.disable
def _route_sdpa(
    state: LayerState,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> torch.Tensor:
    """SD3: `[B, H, N, D]` ordered [image, text] in and out; attnplug sees [text, image]."""
    sdpa = state.host_sdpa
    assert sdpa is not None

    def host_bhnd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        kw = {"enable_gqa": True} if enable_gqa else {}
        return sdpa(q, k, v, attn_mask=m, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    n = int(query.shape[2])
    reason = _unsupported(
        state, query.transpose(1, 2), key.transpose(1, 2), dropout_p, is_causal, scale, enable_gqa
    )
    if reason is None and attn_mask is not None:
        reason = "a mask on an [image, text] sequence"
    split: tuple[int, int] | str = reason if reason is not None else state.split(n)
    if isinstance(split, str):
        state.skip(split)
        return host_bhnd(query, key, value, attn_mask)
    n_txt, n_img = split
    if n_txt == 0 and n_img == 0:  # no split known: hand the sequence over as it is
        call = state.call_for(0, 0)
        return state.session.attention(
            query, key, value, call, None, lambda q, k, v, m: host_bhnd(q, k, v, m)
        )
    n_img = n - n_txt

    def to_txt_first(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[:, :, n_img:], t[:, :, :n_img]], dim=2) if n_txt else t

    def to_img_first(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[:, :, n_txt:], t[:, :, :n_txt]], dim=2) if n_txt else t

    def host_attention(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor | None
    ) -> torch.Tensor:
        return to_txt_first(host_bhnd(to_img_first(q), to_img_first(k), to_img_first(v), m))

    call = state.call_for(n_txt, n_img)
    out = state.session.attention(
        to_txt_first(query), to_txt_first(key), to_txt_first(value), call, None, host_attention
    )
    return to_img_first(out)


def _unsupported(
    state: LayerState,
    query: torch.Tensor,
    key: torch.Tensor,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> str | None:
    """Why this `[B, N, H, D]` call must go to the host unchanged, or None."""
    if not state.active:
        return "the attnplug handle was removed"
    if query.dim() != 4:
        return f"query of shape {tuple(query.shape)} is not [B, N, H, D]"
    if is_causal:
        return "causal attention"
    if dropout_p:
        return f"attention dropout {dropout_p}"
    if scale is not None and not math.isclose(scale, query.shape[-1] ** -0.5, rel_tol=1e-6):
        return f"softmax scale {scale} (attnplug backends use 1/sqrt(head_dim))"
    if enable_gqa and query.shape[2] != key.shape[2]:
        return "grouped-query attention"
    if query.shape[1] != key.shape[1]:
        return f"cross-attention ({query.shape[1]} queries, {key.shape[1]} keys)"
    return None


# ---- the wrapper processor -------------------------------------------------------------------------------


class LayerProcessor:
    """Stands in for one layer's original processor; runs the original's code with attention intercepted.

    `_attention_backend` and `_parallel_config` read and write through to the original, so
    `transformer.set_attention_backend(...)` after `apply` still reaches the teacher/exact path;
    any other attribute is read from the original.
    """

    _attnplug_original: Any
    _attnplug_state: LayerState

    def __init__(
        self,
        original: Any,
        state: LayerState,
        fn: Callable[..., Any],
        hs_pos: int | None,
        ehs_pos: int | None,
    ) -> None:
        self._attnplug_original = original
        self._attnplug_state = state
        self._attnplug_fn = fn
        self._attnplug_hs_pos = hs_pos
        self._attnplug_ehs_pos = ehs_pos

    def _attnplug_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        state = self._attnplug_state
        hs = _arg(args, kwargs, self._attnplug_hs_pos, "hidden_states")
        ehs = _arg(args, kwargs, self._attnplug_ehs_pos, "encoder_hidden_states")
        state.n_img_arg = int(hs.shape[1]) if isinstance(hs, torch.Tensor) and hs.dim() == 3 else None
        state.n_txt_arg = int(ehs.shape[1]) if isinstance(ehs, torch.Tensor) and ehs.dim() == 3 else None
        return self._attnplug_fn(self._attnplug_original, *args, **kwargs)

    @property
    def _attention_backend(self) -> Any:
        return getattr(self._attnplug_original, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value: Any) -> None:
        self._attnplug_original._attention_backend = value

    @property
    def _parallel_config(self) -> Any:
        return getattr(self._attnplug_original, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value: Any) -> None:
        self._attnplug_original._parallel_config = value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_attnplug_"):
            raise AttributeError(name)
        return getattr(self._attnplug_original, name)

    def __repr__(self) -> str:
        return (
            f"attnplug.{type(self).__name__}({self._attnplug_state.layer_key}, "
            f"original={type(self._attnplug_original).__name__})"
        )


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], pos: int | None, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    if pos is not None and pos < len(args):
        return args[pos]
    return None


_WRAPPER_CLASSES: dict[type, type] = {}


def wrapper_class(original_cls: type) -> type:
    """A `LayerProcessor` subclass whose `__call__` has the original's signature.

    diffusers' attention modules filter the keyword arguments they pass on by
    `inspect.signature(processor.__call__)`, so the wrapper must advertise the original's.
    """
    cls = _WRAPPER_CLASSES.get(original_cls)
    if cls is None:

        def __call__(self: LayerProcessor, *args: Any, **kwargs: Any) -> Any:
            return self._attnplug_call(args, kwargs)

        __call__.__signature__ = inspect.signature(original_cls.__call__)  # type: ignore[attr-defined]
        cls = type(
            f"Attnplug{original_cls.__name__}",
            (LayerProcessor,),
            {"__call__": __call__, "__module__": __name__},
        )
        _WRAPPER_CLASSES[original_cls] = cls
    return cls


def interception_kind(processor: Any) -> str | None:
    """`"dispatch"`, `"sdpa"` or None (this processor's attention cannot be intercepted)."""
    fn = getattr(type(processor), "__call__", None)
    if not isinstance(fn, types.FunctionType):
        return None
    if "dispatch_attention_fn" in fn.__code__.co_names and "dispatch_attention_fn" in fn.__globals__:
        return "dispatch"
    if type(processor).__name__ in SDPA_IMAGE_FIRST and "F" in fn.__code__.co_names:
        return "sdpa"
    return None


def build_wrapper(processor: Any, state: LayerState, kind: str) -> LayerProcessor:
    """The wrapper of `processor` for `state`'s layer (`kind` from `interception_kind`)."""
    fn = type(processor).__call__
    scope = dict(fn.__globals__)
    if kind == "dispatch":
        state.host_dispatch = fn.__globals__["dispatch_attention_fn"]
        scope["dispatch_attention_fn"] = make_dispatch(state)
    else:
        state.host_sdpa = fn.__globals__["F"].scaled_dot_product_attention
        scope["F"] = make_functional(state)
    # A code object of its own per layer: torch.compile caches compiled frames per code object, and a frame
    # compiled against one layer's globals must not be reused with another layer's.
    code = fn.__code__
    if hasattr(code, "co_qualname"):
        code = code.replace(co_qualname=f"{code.co_qualname}[attnplug:{state.layer_key}]")
    else:  # Python 3.10
        code = code.replace(co_name=code.co_name)
    rebound = types.FunctionType(code, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    rebound.__kwdefaults__ = fn.__kwdefaults__
    rebound.__qualname__ = fn.__qualname__
    names = [p.name for p in inspect.signature(fn).parameters.values()][1:]  # without self
    positional = [
        n
        for n, p in zip(names, list(inspect.signature(fn).parameters.values())[1:])
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    hs_pos = positional.index("hidden_states") if "hidden_states" in positional else None
    ehs_pos = positional.index("encoder_hidden_states") if "encoder_hidden_states" in positional else None
    return wrapper_class(type(processor))(processor, state, rebound, hs_pos, ehs_pos)

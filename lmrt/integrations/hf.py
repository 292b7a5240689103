"""lmrt as a Hugging Face transformers attention implementation: attn_implementation="lmrt".

    import lmrt
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="lmrt")   # or model.set_attn_implementation

Every attention layer of a model that dispatches through transformers' AttentionInterface then runs on
lmrt.ops.scaled_dot_product_attention. Two registrations make that work: the attention function in
`transformers.AttentionInterface`, and the mask function in `transformers.masking_utils.AttentionMaskInterface`
(transformers' own sdpa mask: 4-D boolean, True = attend, or None where a plain causal or full mask suffices).
Without the second, transformers builds no mask at all for an implementation it does not know, and padding would
be silently ignored.

`import lmrt` registers both without importing transformers (which takes seconds): if transformers' modules are
already imported it registers into them at once, otherwise an import hook registers into each right after it is
first executed (see `install_registration_hook`). `register()` does it explicitly.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable
from types import ModuleType

import torch

from lmrt import ops

ATTN_IMPLEMENTATION = "lmrt"

_warned_output_attentions = False


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa_attention_forward on lmrt.ops.scaled_dot_product_attention.

    query, key and value are (batch, heads, length, head_dim); key and value may have fewer heads than query
    (grouped-query attention, when `module.num_key_value_groups` > 1), which lmrt handles without repeating them.
    `attention_mask` is transformers' 4-D mask (boolean, True = attend; or float, added to the scores) or None.
    `position_bias` (T5-style, added to the scores) is folded into a float mask. Returns the output as a contiguous
    (batch, length, heads, head_dim) tensor and None: attention weights are not computed.

    Raises NotImplementedError for what the op cannot compute and sdpa would silently leave out: attention sinks
    (`s_aux`) and score soft-capping (`softcap`).
    """
    global _warned_output_attentions
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError('attn_implementation="lmrt": this model uses attention sinks (`s_aux`), which '
                                  'lmrt.ops.scaled_dot_product_attention does not compute; use "eager"')
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(f'attn_implementation="lmrt": this model soft-caps the attention scores '
                                  f'(`softcap`={kwargs["softcap"]}), which lmrt does not do; use "eager", or set the '
                                  f"config's attn_logit_softcapping to None to run without it (as \"sdpa\" does)")
    if kwargs.get("output_attentions", False) and not _warned_output_attentions:
        _warned_output_attentions = True
        warnings.warn('attn_implementation="lmrt" does not return attention weights (output_attentions=True); use '
                      '"eager" for them', stacklevel=2)
    enable_gqa = getattr(module, "num_key_value_groups", 1) > 1
    q_length, kv_length = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As in sdpa: causal masking by the flag only when transformers built no mask (it returns None for a plain causal
    # mask) and not when decoding a single token, which sees every cached key.
    is_causal = q_length > 1 and attention_mask is None and is_causal
    if is_causal and kv_length > q_length:
        # A prefill into an empty static cache: top-left causal alignment hides every key past the queries, so drop
        # them rather than compute scores that are masked anyway.
        key, value = key[:, :, :q_length], value[:, :, :q_length]
        if position_bias is not None:
            position_bias = position_bias[..., :q_length]
    if position_bias is not None:
        attention_mask = _position_bias_mask(position_bias, attention_mask, is_causal, q_length, key)
        is_causal = False
    output = ops.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                              is_causal=is_causal, scale=scaling, enable_gqa=enable_gqa)
    return output.transpose(1, 2).contiguous(), None


def _position_bias_mask(position_bias: torch.Tensor, attention_mask: torch.Tensor | None, is_causal: bool,
                        q_length: int, key: torch.Tensor) -> torch.Tensor:
    """The float mask that adds `position_bias` to the scores and masks as `attention_mask` or `is_causal` say, with
    transformers' value for a masked score (the dtype's lowest, not -inf), as its create_position_bias_mask does."""
    min_value = torch.finfo(key.dtype).min
    if attention_mask is None:
        if not is_causal:
            return position_bias
        kv_length = key.shape[2]
        causal = torch.ones(q_length, kv_length, dtype=torch.bool, device=key.device).tril()
        return torch.where(causal, position_bias, min_value)
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, position_bias, min_value)
    return position_bias + attention_mask


def _register_attention(modeling_utils: ModuleType) -> None:
    modeling_utils.AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)


def _register_mask(masking_utils: ModuleType) -> None:
    masking_utils.AttentionMaskInterface.register(ATTN_IMPLEMENTATION, masking_utils.sdpa_mask)


# The transformers module each registration goes into.
_REGISTRATIONS: dict[str, Callable[[ModuleType], None]] = {
    "transformers.masking_utils": _register_mask,
    "transformers.modeling_utils": _register_attention,
}


def register() -> None:
    """Register "lmrt" as an attention implementation with transformers now (importing transformers). Idempotent.

    `import lmrt` already does this whenever transformers gets imported; call it if something removed the
    registration, or to get an error rather than a warning when it fails.
    """
    for name, register_into in _REGISTRATIONS.items():
        register_into(importlib.import_module(name))


class _RegistrationHook(importlib.abc.MetaPathFinder):
    """A post-import hook: runs a registration right after the transformers module it targets is executed.

    It finds the module's spec with the other finders on sys.meta_path and wraps that spec's loader's exec_module;
    the module itself is imported as usual. It removes itself from sys.meta_path once every target has run.
    """

    def __init__(self, pending: dict[str, Callable[[ModuleType], None]]):
        self.pending = pending

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or isinstance(loader, type) or not hasattr(loader, "exec_module"):
            # No per-module loader instance to wrap (a namespace package, a class-level loader): leave the import
            # alone; register() still works.
            return spec
        try:
            self._wrap_exec_module(loader)
        except (AttributeError, TypeError):  # a loader whose attributes cannot be set (__slots__)
            pass
        return spec

    def _wrap_exec_module(self, loader: importlib.abc.Loader) -> None:
        exec_module = loader.exec_module
        had_own = "exec_module" in vars(loader)

        def exec_module_then_register(module: ModuleType) -> None:
            # Undo the wrapping first, so that a loader shared by other modules runs as before from now on.
            if had_own:
                loader.exec_module = exec_module
            else:
                del loader.exec_module
            exec_module(module)
            register_into = self.pending.pop(module.__name__, None)
            if register_into is not None:
                _register_or_warn(register_into, module)
            if not self.pending and self in sys.meta_path:
                sys.meta_path.remove(self)

        loader.exec_module = exec_module_then_register


def _register_or_warn(register_into: Callable[[ModuleType], None], module: ModuleType) -> None:
    # Runs inside someone else's import: a failure must not break it.
    try:
        register_into(module)
    except Exception as error:
        warnings.warn(f'lmrt could not register attn_implementation="{ATTN_IMPLEMENTATION}" with {module.__name__} '
                      f"({type(error).__name__}: {error}); it is unavailable in this process", stacklevel=2)


_hook: _RegistrationHook | None = None


def install_registration_hook() -> None:
    """Register into the transformers modules already imported, and hook the others' first import.

    Called by `import lmrt`; imports nothing of transformers. Idempotent.
    """
    global _hook
    if _hook is not None or importlib.util.find_spec("transformers") is None:
        return
    pending = {}
    for name, register_into in _REGISTRATIONS.items():
        module = sys.modules.get(name)
        if module is None:
            pending[name] = register_into
        else:
            _register_or_warn(register_into, module)
    if pending:
        # First on sys.meta_path, or the path finder would load these modules before the hook sees them.
        _hook = _RegistrationHook(pending)
        sys.meta_path.insert(0, _hook)

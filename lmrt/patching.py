"""lmrt.patch and lmrt.unpatch: swap the normalization and softmax modules of any model for lmrt's, in place.

    report = lmrt.patch(model)    # nn.LayerNorm, nn.RMSNorm, nn.Softmax and Hugging Face's RMSNorm classes -> lmrt.nn
    print(report)                 # which modules were replaced, from which class to which
    lmrt.unpatch(model)           # the original module objects back

A replacement of a torch.nn module is that module's instance state under the lmrt class: it shares the original's
attributes, Parameter objects (an optimizer built before patching still trains them) and hooks (their handles still
remove them), and unpatch gives the original whatever the replacement holds by then; state_dict keys do not change.
Only modules of exactly the listed classes are replaced: a subclass may have a forward of its own, and lmrt's modules
are left as they are, so patching twice replaces nothing the second time. The model itself cannot be replaced in
place, so a model that is itself such a module raises.
"""

from __future__ import annotations

import dataclasses

import torch

from lmrt import nn as lmrt_nn
from lmrt import ops

# torch.nn classes and their lmrt subclasses, which have the same constructor, attributes and parameters: a
# replacement holds the original's instance state (configuration, parameters, hooks) under the lmrt class.
TORCH_REPLACEMENTS: dict[type[torch.nn.Module], type[torch.nn.Module]] = {
    torch.nn.LayerNorm: lmrt_nn.LayerNorm,
    torch.nn.RMSNorm: lmrt_nn.RMSNorm,
    torch.nn.Softmax: lmrt_nn.Softmax,
}

# The RMSNorm classes of Hugging Face transformers whose forward is LlamaRMSNorm's, token for token:
#     weight * (x.float() * rsqrt(mean(x.float() ** 2, -1) + variance_epsilon)).to(x.dtype)
# Read from the source of transformers 5.17.0 (tests/integrations/test_hf.py checks the installed version's source).
# Left out on purpose: Gemma's (it scales by 1 + weight), T5LayerNorm (it casts to the weight's dtype, not the
# input's), Olmo2's (weight multiplied before the cast), and every norm with a bias, a gate or a mean.
# Matched by class name in a transformers module, so that lmrt never imports transformers to find them.
HF_RMS_NORM_CLASSES = frozenset({
    "AXK1RMSNorm", "AXK2RMSNorm", "Aimv2RMSNorm", "ApertusRMSNorm", "ArceeRMSNorm", "AriaTextRMSNorm", "BambaRMSNorm",
    "BitNetRMSNorm", "BltRMSNorm", "ChameleonRMSNorm", "ClvpRMSNorm", "Cohere2MoeRMSNorm", "Cosmos3EdgeTextRMSNorm",
    "CsmRMSNorm", "CwmRMSNorm", "DeepseekOcr2TextRMSNorm", "DeepseekOcr2VisionRMSNorm", "DeepseekV2RMSNorm",
    "DeepseekV32RMSNorm", "DeepseekV3RMSNorm", "DeepseekV4RMSNorm", "Deimv2RMSNorm", "DiaRMSNorm", "DiffLlamaRMSNorm",
    "DogeRMSNorm", "Dots1RMSNorm", "Emu3RMSNorm", "Ernie4_5RMSNorm", "Ernie4_5_MoeRMSNorm", "Ernie4_5_VLMoeRMSNorm",
    "EuroBertRMSNorm", "EvollaRMSNorm", "Exaone4RMSNorm", "Exaone4_5_RMSNorm", "ExaoneMoeRMSNorm", "FalconH1RMSNorm",
    "FalconMambaRMSNorm", "Glm4MoeLiteRMSNorm", "Glm4MoeRMSNorm", "Glm4RMSNorm", "Glm4vMoeRMSNorm",
    "Glm4vMoeTextRMSNorm", "Glm4vRMSNorm", "Glm5NextRMSNorm", "Glm5NextTextRMSNorm", "GlmImageRMSNorm",
    "GlmMoeDsaRMSNorm", "GlmOcrRMSNorm", "GlmRMSNorm", "Granite4VisionTextRMSNorm", "GraniteMoeHybridRMSNorm",
    "GraniteMoeRMSNorm", "GraniteMoeSWARMSNorm", "GraniteMoeSharedRMSNorm", "GraniteRMSNorm", "GraniteSWARMSNorm",
    "HYV3RMSNorm", "HYV4RMSNorm", "HiggsAudioV2RMSNorm", "HunYuanDenseV1RMSNorm", "HunYuanMoEV1RMSNorm",
    "HunYuanVLRMSNorm", "HyperCLOVAXRMSNorm", "Idefics2RMSNorm", "Idefics3RMSNorm", "InklingRMSNorm",
    "InternVLVisionRMSNorm", "JambaRMSNorm", "JetMoeRMSNorm", "KimiLinearRMSNorm", "LagunaRMSNorm", "Lfm2MoeRMSNorm",
    "Lfm2RMSNorm", "LightOnOcrRMSNorm", "LlamaRMSNorm", "LongcatFlashRMSNorm", "Mamba2RMSNorm", "MambaRMSNorm",
    "MellumRMSNorm", "MiMoV2FlashRMSNorm", "MiniCPM3RMSNorm", "MiniMaxM2RMSNorm", "MiniMaxRMSNorm",
    "Ministral3RMSNorm", "MinistralRMSNorm", "Mistral3RMSNorm", "Mistral4RMSNorm", "MistralRMSNorm", "MixtralRMSNorm",
    "MllamaTextRMSNorm", "MuseGlimmerAssistantRMSNorm", "NemotronHRMSNorm", "NeuCodecRMSNorm", "OlmoeRMSNorm",
    "Ovis2RMSNorm", "PaddleOCRRMSNorm", "PeAudioEncoderRMSNorm", "PeAudioVideoEncoderRMSNorm",
    "PeVideoEncoderRMSNorm", "Phi3RMSNorm", "Phi4MultimodalRMSNorm", "PixtralRMSNorm", "QianfanOCRVisionRMSNorm",
    "Qwen2MoeRMSNorm", "Qwen2RMSNorm", "Qwen2VLRMSNorm", "Qwen2_5OmniRMSNorm", "Qwen2_5_VLRMSNorm", "Qwen3MoeRMSNorm",
    "Qwen3OmniMoeCode2WavRMSNorm", "Qwen3OmniMoeRMSNorm", "Qwen3OmniMoeTextRMSNorm", "Qwen3OmniMoeThinkerTextRMSNorm",
    "Qwen3RMSNorm", "Qwen3VLMoeTextRMSNorm", "Qwen3VLTextRMSNorm", "Sapiens2RMSNorm", "SeedOssRMSNorm",
    "SmolLM3RMSNorm", "SolarOpenRMSNorm", "TimesFm2_5RMSNorm", "TimesFmRMSNorm", "VibeVoiceAcousticTokenizerRMSNorm",
    "VibeVoiceAsrRMSNorm", "VibeVoiceRMSNorm", "VoxtralRealtimeRMSNorm", "Xcodec2RMSNorm", "YoutuRMSNorm",
    "Zamba2RMSNorm", "ZambaRMSNorm", "ZayaRMSNorm",
})


class HuggingFaceRMSNorm(lmrt_nn.RMSNorm):
    """lmrt.nn.RMSNorm in place of a Hugging Face RMSNorm (HF_RMS_NORM_CLASSES), with its output dtype.

    When the weight's dtype is the input's, this is lmrt.nn.RMSNorm. Otherwise (bfloat16 activations, a float32
    weight) it computes as Hugging Face does: the normalized value rounded to the input's dtype, times the weight in
    the promoted dtype.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == input.dtype:
            return super().forward(input)
        return self.weight * ops.rms_norm(input, self.normalized_shape, None, self.eps)


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


@dataclasses.dataclass(frozen=True)
class Replacement:
    """Module `name` (its qualified name in the model) went from class `old_class` to `new_class`."""

    name: str
    old_class: type
    new_class: type

    def __str__(self) -> str:
        return f"{self.name}: {_class_name(self.old_class)} -> {_class_name(self.new_class)}"


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Module `name`, of class `module_class`, would have been replaced but was left as it is, for `reason`."""

    name: str
    module_class: type
    reason: str

    def __str__(self) -> str:
        return f"{self.name} ({_class_name(self.module_class)}): {self.reason}"


@dataclasses.dataclass(frozen=True)
class PatchReport:
    """What lmrt.patch or lmrt.unpatch (`action`) did to a model; `len(report)` is the number of replacements."""

    action: str
    replaced: tuple[Replacement, ...] = ()
    skipped: tuple[Skipped, ...] = ()

    def __len__(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        count = f"{len(self.replaced)} module{'' if len(self.replaced) == 1 else 's'}"
        lines = [f"lmrt.{self.action} replaced {count}" + (":" if self.replaced else "")]
        lines += [f"  {replacement}" for replacement in self.replaced]
        if self.skipped:
            lines.append(f"left {len(self.skipped)} as they are:")
            lines += [f"  {skipped}" for skipped in self.skipped]
        return "\n".join(lines)


def patch(model: torch.nn.Module) -> PatchReport:
    """Replace, in place, every submodule of `model` that is exactly a torch.nn.LayerNorm, torch.nn.RMSNorm or
    torch.nn.Softmax by its lmrt.nn counterpart, and every Hugging Face RMSNorm of HF_RMS_NORM_CLASSES by a
    HuggingFaceRMSNorm, an lmrt.nn.RMSNorm (eps = its `variance_epsilon`) with Hugging Face's output dtype.

    The replacements share the originals' Parameter objects and training mode. Hugging Face's RMSNorm rounds the
    normalized value to the input's dtype and then multiplies by the weight in the promoted dtype; with a weight of
    the input's dtype lmrt's multiplies in float32 and rounds once, so for float16/bfloat16 the results differ by
    about an ulp (lmrt's being the more accurate).

    A module whose forward was replaced on the instance (by a hook library, say) or that Module.compile() compiled, a
    Hugging Face norm with hooks or an unexpected structure, and a Softmax with dim=None are left as they are and
    listed in the report's `skipped`.
    A module shared under several names is replaced by one module, listed under each name.
    """
    _check_model("patch", model)
    if _candidate(model):
        raise ValueError(f"lmrt.patch: `model` is itself a {_class_name(type(model))}; only submodules can be "
                         f"replaced in place. Patch the model that contains it, or build the lmrt.nn module directly")
    new_by_old: dict[int, torch.nn.Module] = {}
    replaced, skipped = [], []
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name or not _candidate(module):
            continue
        if id(module) not in new_by_old:
            reason = _reason_to_skip(module)
            if reason:
                skipped.append(Skipped(name, type(module), reason))
                continue
            new_by_old[id(module)] = _replacement(module)
        new = new_by_old[id(module)]
        _set_submodule(model, name, new)
        replaced.append(Replacement(name, type(module), type(new)))
    return PatchReport("patch", tuple(replaced), tuple(skipped))


def unpatch(model: torch.nn.Module) -> PatchReport:
    """Put back the original module objects that lmrt.patch replaced in `model`.

    The originals get the replacements' current Parameter objects (should they have been swapped since, by
    `model.to_empty()`, say) and training mode; those of torch.nn classes get all their instance state (attributes
    set and hooks registered while patched).
    """
    _check_model("unpatch", model)
    replaced = []
    for name, module in list(model.named_modules(remove_duplicate=False)):
        original = vars(module).get("_lmrt_original")
        if not name or original is None:
            continue
        if _is_hf_rms_norm(original):
            original.weight, original.training = module.weight, module.training
        else:
            original.__dict__.update({key: value for key, value in vars(module).items() if key != "_lmrt_original"})
        _set_submodule(model, name, original)
        replaced.append(Replacement(name, type(module), type(original)))
    return PatchReport("unpatch", tuple(replaced))


def _check_model(action: str, model: torch.nn.Module) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"lmrt.{action}: `model` must be a torch.nn.Module, got {type(model).__name__}")


def _is_hf_rms_norm(module: torch.nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ in HF_RMS_NORM_CLASSES and cls.__module__.startswith("transformers.")


def _candidate(module: torch.nn.Module) -> bool:
    return type(module) in TORCH_REPLACEMENTS or _is_hf_rms_norm(module)


def _reason_to_skip(module: torch.nn.Module) -> str | None:
    if "forward" in vars(module):
        return "its forward is replaced on the instance; swapping the module would bypass that"
    if vars(module).get("_compiled_call_impl") is not None:
        return "Module.compile() compiled it; the compiled call would go on running the original"
    if isinstance(module, torch.nn.Softmax) and module.dim is None:
        return "dim=None (the deprecated implicit dim) is not supported by lmrt.nn.Softmax"
    if _is_hf_rms_norm(module):
        weight = module._parameters.get("weight")
        if list(module._parameters) != ["weight"] or weight is None or weight.dim() != 1 or module._buffers or \
                module._modules or not isinstance(getattr(module, "variance_epsilon", None), (int, float)):
            return "its structure is not LlamaRMSNorm's (one 1-D `weight` parameter and a float `variance_epsilon`)"
        if any(getattr(module, hooks, None) for hooks in _HOOK_DICTS):
            return "it has hooks, which a new lmrt.nn.RMSNorm would not carry"
    return None


def _replacement(module: torch.nn.Module) -> torch.nn.Module:
    if _is_hf_rms_norm(module):
        new = HuggingFaceRMSNorm(tuple(module.weight.shape), eps=float(module.variance_epsilon), device="meta")
        new.weight = module.weight
        new.training = module.training
    else:
        new = object.__new__(TORCH_REPLACEMENTS[type(module)])
        # The same containers (parameter and hook dicts, ...): a hook's RemovableHandle holds its dict.
        new.__dict__.update(vars(module))
    # In __dict__ rather than as an attribute: nn.Module.__setattr__ would register it as a submodule.
    vars(new)["_lmrt_original"] = module
    return new


def _set_submodule(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    model.get_submodule(parent_name).register_module(child_name, module)


def _class_name(cls: type) -> str:
    """The public name of a class: torch.nn.LayerNorm rather than torch.nn.modules.normalization.LayerNorm."""
    for namespace, prefix in ((torch.nn, "torch.nn"), (lmrt_nn, "lmrt.nn")):
        if getattr(namespace, cls.__name__, None) is cls:
            return f"{prefix}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"

"""attn_implementation="lmrt" in Hugging Face transformers, and lmrt.patch on its models: tiny models built from a
config (no download), compared with the same weights under "sdpa"."""

import ast
import copy
import os
import re
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoModel, BertConfig, GPT2Config, LlamaConfig  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

import lmrt  # noqa: E402
from lmrt.integrations import hf  # noqa: E402
from lmrt.patching import HF_RMS_NORM_CLASSES, HuggingFaceRMSNorm  # noqa: E402
from tests.conftest import DEVICE  # noqa: E402
from tests.tolerance import ULP_AT_ONE, assert_within_torch_error  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB = 97


def gpt2_config():
    return GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                      eos_token_id=0)


def bert_config():  # an encoder: attention without a causal mask
    return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      vocab_size=VOCAB, max_position_embeddings=64)


def llama_config():  # grouped-query attention: 2 key/value heads for 4 query heads
    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-5,
                       bos_token_id=0, eos_token_id=0)


CONFIGS = {"gpt2": gpt2_config, "bert": bert_config, "llama": llama_config}


def build(name, attn_implementation):
    # A config of its own per model: from_config records the attention implementation in the config it is given.
    model = AutoModel.from_config(CONFIGS[name](), attn_implementation=attn_implementation).to(DEVICE).eval()
    assert model.config._attn_implementation == attn_implementation
    return model


def inputs(padded: bool):
    ids = torch.randint(1, VOCAB, (2, 9), device=DEVICE)
    mask = torch.ones(2, 9, dtype=torch.long, device=DEVICE)
    if padded:
        # Left padding: in a causal model the tokens after the padding would see it if the mask were lost (right
        # padding sits after every real token and would hide such a bug).
        mask[0, :3] = 0
    return ids, mask


def forward_backward(model, ids, mask, grad_output):
    """The hidden states at the real (not padded) positions, and the gradients of every parameter of the loss
    <hidden states, grad_output> over those positions (padded queries' outputs are meaningless in causal models)."""
    model.zero_grad()
    hidden = model(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    (hidden[real] * grad_output[real].to(hidden.dtype)).sum().backward()
    # Parameters outside the loss (BERT's pooler) have no gradient.
    return {"output": hidden[real].detach()} | {f"grad {n}": p.grad for n, p in model.named_parameters()
                                                if p.grad is not None}


def check_matches(model, reference, ids, mask):
    """`model`'s results are within the op tolerance rule (tests/tolerance.py) of the exact ones, computed by
    `reference` in float64: at most 2x (3x for gradients, as for attention) the error of `reference` in float32,
    plus 4 ulps. Summed over a model, the float32 roundings of two sound computations differ by more than
    assert_close's elementwise defaults allow, even when every op is PyTorch's own."""
    grad_output = torch.randn(*ids.shape, reference.config.hidden_size, device=DEVICE)
    results = forward_backward(model, ids, mask, grad_output)
    torch_results = forward_backward(reference, ids, mask, grad_output)
    exact = forward_backward(copy.deepcopy(reference).double(), ids, mask, grad_output.double())
    assert results.keys() == exact.keys()
    for name, result in results.items():
        assert_within_torch_error(name, result, torch_results[name], exact[name],
                                  factor=2.0 if name == "output" else 3.0)


@pytest.fixture
def lmrt_calls(monkeypatch):
    """Records (mask given, is_causal, enable_gqa) for every call of lmrt.ops.scaled_dot_product_attention."""
    calls = []
    original = lmrt.ops.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append((attn_mask is not None, is_causal, enable_gqa))
        return original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    monkeypatch.setattr(lmrt.ops, "scaled_dot_product_attention", recording)
    return calls


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("name", CONFIGS)
def test_matches_sdpa(name, padded, lmrt_calls):
    sdpa_model = build(name, "sdpa")
    model = build(name, "lmrt")
    model.load_state_dict(sdpa_model.state_dict())
    check_matches(model, sdpa_model, *inputs(padded))

    # Every layer ran on lmrt: with transformers' mask when there is padding, else with the causal flag (decoders)
    # or nothing (the encoder).
    causal, gqa = name != "bert", name == "llama"
    assert lmrt_calls == ([(True, False, gqa)] * 2 if padded else [(False, causal, gqa)] * 2)


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_patched_llama_on_triton_matches_sdpa(padded):
    """The drop-in path end to end on the Triton kernels: attention on lmrt and LlamaRMSNorm swapped by lmrt.patch."""
    sdpa_model = build("llama", "sdpa")
    model = copy.deepcopy(sdpa_model)
    model.set_attn_implementation("lmrt")
    assert sdpa_model.config._attn_implementation == "sdpa"
    assert len(lmrt.patch(model)) == 5
    with lmrt.backend("triton"):
        check_matches(model, sdpa_model, *inputs(padded))


def test_set_attn_implementation(lmrt_calls):
    sdpa_model = build("gpt2", "sdpa")
    model = copy.deepcopy(sdpa_model)
    model.set_attn_implementation("lmrt")
    assert model.config._attn_implementation == "lmrt" and sdpa_model.config._attn_implementation == "sdpa"
    check_matches(model, sdpa_model, *inputs(padded=True))
    assert len(lmrt_calls) == 2


def test_patch_swaps_llama_rms_norm():
    model = build("llama", "sdpa")
    originals = {name: module for name, module in model.named_modules() if type(module).__name__ == "LlamaRMSNorm"}
    reference = copy.deepcopy(model)

    report = lmrt.patch(model)
    names = ["layers.0.input_layernorm", "layers.0.post_attention_layernorm", "layers.1.input_layernorm",
             "layers.1.post_attention_layernorm", "norm"]
    assert [r.name for r in report.replaced] == names == list(originals)
    assert {(r.old_class.__name__, r.new_class) for r in report.replaced} == {("LlamaRMSNorm", HuggingFaceRMSNorm)}
    assert ("layers.0.input_layernorm: transformers.models.llama.modeling_llama.LlamaRMSNorm -> "
            "lmrt.patching.HuggingFaceRMSNorm") in str(report)
    for name, original in originals.items():
        module = model.get_submodule(name)
        assert module.weight is original.weight
        assert module.eps == original.variance_epsilon == 1e-5
        assert module.normalized_shape == (32,) and not module.training
    assert list(model.state_dict()) == list(reference.state_dict())

    # float32 throughout, so Hugging Face's cast of the normalized value to the input dtype is a no-op.
    check_matches(model, reference, *inputs(padded=True))

    lmrt.unpatch(model)
    assert all(model.get_submodule(name) is original for name, original in originals.items())


@pytest.mark.parametrize("weight_dtype,input_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16),
                                                       (torch.bfloat16, torch.bfloat16)], ids=str)
def test_patched_rms_norm_keeps_hugging_face_dtypes(weight_dtype, input_dtype):
    """LlamaRMSNorm multiplies by the weight in the promoted dtype (a float32 norm in a bfloat16 model gives
    float32); its replacement gives the same dtype, and values within an ulp of the coarser dtype."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    original = LlamaRMSNorm(32).to(weight_dtype)
    torch.nn.init.normal_(original.weight)
    model = torch.nn.Sequential(original)
    reference = copy.deepcopy(model)
    lmrt.patch(model)
    x = torch.randn(3, 32, dtype=input_dtype, requires_grad=True)
    out, expected = model(x), reference(x)
    assert out.dtype == expected.dtype == torch.promote_types(weight_dtype, input_dtype)
    ulp = max(ULP_AT_ONE[weight_dtype], ULP_AT_ONE[input_dtype])
    scale = expected.detach().abs().max().item()
    torch.testing.assert_close(out, expected, rtol=0, atol=ulp * scale)
    grad_x, grad_w = torch.autograd.grad(out.sum(), [x, model[0].weight])
    expected_x, expected_w = torch.autograd.grad(expected.sum(), [x, reference[0].weight])
    assert grad_x.dtype == input_dtype and grad_w.dtype == weight_dtype
    torch.testing.assert_close(grad_x, expected_x, rtol=0, atol=4 * ulp * expected_x.abs().max().item())
    torch.testing.assert_close(grad_w, expected_w, rtol=0, atol=4 * ulp * expected_w.abs().max().item())


# Direct calls of the attention function against transformers' sdpa_attention_forward, for the cases the tiny models
# do not reach: T5-style position_bias, float masks, a longer key than query, decoding.
B, H, L, E = 2, 4, 5, 8
ATTENTION_CASES = {
    "causal": dict(),
    "encoder": dict(module_causal=False),
    "gqa-causal": dict(kv_heads=2),
    "gqa-bool-mask": dict(kv_heads=2, mask="bool"),
    "float-mask": dict(mask="float"),
    "decode": dict(q_len=1, kv_len=7),
    "causal-longer-key": dict(kv_len=8),
    "bias": dict(bias=True, module_causal=False),
    "bias-causal": dict(bias=True),
    "bias-bool-mask": dict(bias=True, mask="bool"),
    "bias-float-mask": dict(bias=True, mask="float"),
    "bias-causal-longer-key": dict(bias=True, kv_len=8),
    "scaled": dict(scaling=0.5, is_causal=False),
}


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_forward_matches_sdpa_attention_forward(case):
    c = dict(kv_heads=H, q_len=L, kv_len=L, mask=None, bias=False, module_causal=True, scaling=None, is_causal=None)
    c |= ATTENTION_CASES[case]
    module = types.SimpleNamespace(num_key_value_groups=H // c["kv_heads"], is_causal=c["module_causal"])
    q = torch.randn(B, H, c["q_len"], E)
    k, v = torch.randn(2, B, c["kv_heads"], c["kv_len"], E)
    mask_shape = (B, 1, c["q_len"], c["kv_len"])
    mask = {None: None, "bool": torch.rand(mask_shape) > 0.3, "float": torch.randn(mask_shape)}[c["mask"]]
    if c["mask"] == "bool":
        mask[..., 0] = True  # every query sees a key
    bias = torch.randn(1, H, c["q_len"], c["kv_len"]) if c["bias"] else None
    leaves = [t.requires_grad_() for t in (q, k, v) + ((bias,) if c["bias"] else ())]
    grad_output = torch.randn(B, c["q_len"], H, E)

    def run(attention):
        kwargs = {"position_bias": bias} if c["bias"] else {}
        out, weights = attention(module, q, k, v, mask, scaling=c["scaling"], is_causal=c["is_causal"], **kwargs)
        assert weights is None
        grads = torch.autograd.grad(out, leaves, grad_output)
        return out, grads

    out, grads = run(hf.attention_forward)
    expected_out, expected_grads = run(sdpa_attention_forward)
    assert out.shape == (B, c["q_len"], H, E) and out.is_contiguous()
    torch.testing.assert_close(out, expected_out)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


def test_output_attentions_warns_once(monkeypatch):
    monkeypatch.setattr(hf, "_warned_output_attentions", False)
    q = torch.randn(1, 2, 3, 4)
    module = types.SimpleNamespace(is_causal=True)
    with pytest.warns(UserWarning, match='attn_implementation="lmrt" does not return attention weights'):
        hf.attention_forward(module, q, q, q, None, output_attentions=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.attention_forward(module, q, q, q, None, output_attentions=True)


@pytest.mark.parametrize("kwarg,value,match", [("s_aux", torch.zeros(2), "attention sinks"),
                                                ("softcap", 50.0, r"soft-caps .* \(`softcap`=50.0\)")])
def test_refuses_what_it_cannot_compute(kwarg, value, match):
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(NotImplementedError, match=match):
        hf.attention_forward(types.SimpleNamespace(is_causal=True), q, q, q, None, **{kwarg: value})


def test_registered():
    assert ALL_ATTENTION_FUNCTIONS["lmrt"] is hf.attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["lmrt"] is sdpa_mask
    hf.register()  # idempotent
    assert ALL_ATTENTION_FUNCTIONS["lmrt"] is hf.attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["lmrt"] is sdpa_mask
    assert not any(isinstance(finder, hf._RegistrationHook) for finder in sys.meta_path)  # done, so removed


def test_install_registers_into_imported_modules_at_once(monkeypatch):
    monkeypatch.delitem(type(ALL_ATTENTION_FUNCTIONS)._global_mapping, "lmrt")
    monkeypatch.delitem(type(ALL_MASK_ATTENTION_FUNCTIONS)._global_mapping, "lmrt")
    monkeypatch.setattr(hf, "_hook", None)
    meta_path = list(sys.meta_path)
    hf.install_registration_hook()
    assert ALL_ATTENTION_FUNCTIONS["lmrt"] is hf.attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["lmrt"] is sdpa_mask
    assert sys.meta_path == meta_path  # nothing left to hook


def test_registration_hook(tmp_path, monkeypatch):
    """The hook runs a registration right after its target module executes, warns (and lets the import succeed)
    when the registration fails, retries after a failed import, and removes itself when all are done."""
    package = tmp_path / "lmrt_hook_probe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "good.py").write_text("VALUE = 1\n")
    (package / "bad.py").write_text("VALUE = 2\n")
    (package / "broken.py").write_text("import os\nif os.environ.get('PROBE_BROKEN'):\n    raise ImportError('no')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registered = []

    def fail(module):
        raise RuntimeError("boom")

    hook = hf._RegistrationHook({"lmrt_hook_probe.good": lambda module: registered.append(module.VALUE),
                                 "lmrt_hook_probe.bad": fail,
                                 "lmrt_hook_probe.broken": lambda module: registered.append("broken")})
    monkeypatch.setattr(sys, "meta_path", [hook, *sys.meta_path])
    for name in ("lmrt_hook_probe", "lmrt_hook_probe.good", "lmrt_hook_probe.bad", "lmrt_hook_probe.broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)

    import lmrt_hook_probe.good

    assert registered == [1]
    assert lmrt_hook_probe.good.__loader__.exec_module.__name__ == "exec_module"  # the loader's own again
    with pytest.warns(UserWarning, match=r"could not register .* with lmrt_hook_probe.bad \(RuntimeError: boom\)"):
        import lmrt_hook_probe.bad
    assert lmrt_hook_probe.bad.VALUE == 2
    monkeypatch.setenv("PROBE_BROKEN", "1")
    with pytest.raises(ImportError, match="no"):
        import lmrt_hook_probe.broken
    assert hook in sys.meta_path and registered == [1]
    monkeypatch.delenv("PROBE_BROKEN")
    import lmrt_hook_probe.broken  # noqa: F401

    assert registered == [1, "broken"] and hook not in sys.meta_path


def _allow_listed_classes(path: Path) -> list[ast.ClassDef]:
    """The top-level classes of a source file whose names are in HF_RMS_NORM_CLASSES, each parsed on its own (much
    faster than parsing the whole file)."""
    lines = path.read_text().splitlines()
    classes = []
    for start, line in enumerate(lines):
        match = re.match(r"class (\w+)\(", line)
        if match and match.group(1) in HF_RMS_NORM_CLASSES:
            end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()),
                       len(lines))
            classes.append(ast.parse("\n".join(lines[start:end])).body[0])
    return classes


def _method_body(cls: ast.ClassDef, name: str) -> str:
    method = next(node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == name)
    body = [node for node in method.body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    return "\n".join(ast.dump(node) for node in body)


def test_rms_norm_allow_list_matches_installed_source():
    """Every allow-listed class found in the installed transformers has LlamaRMSNorm's __init__ and forward."""
    found = [cls for path in sorted((Path(transformers.__file__).parent / "models").glob("*/modeling_*.py"))
             for cls in _allow_listed_classes(path)]
    assert {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"} <= {cls.name for cls in found}
    llama = next(cls for cls in found if cls.name == "LlamaRMSNorm")
    for cls in found:
        assert _method_body(cls, "forward") == _method_body(llama, "forward"), cls.name
        assert _method_body(cls, "__init__") == _method_body(llama, "__init__"), cls.name


# Import order, in fresh interpreters: the four run at once (a transformers import takes seconds each).
USE_LMRT = """
import sys
import torch
import lmrt
from transformers import AutoModel, GPT2Config

calls = []
original = lmrt.ops.scaled_dot_product_attention


def recording(*args, **kwargs):
    calls.append(kwargs["attn_mask"] is not None)
    return original(*args, **kwargs)


lmrt.ops.scaled_dot_product_attention = recording
config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=64, bos_token_id=0, eos_token_id=0)
model = AutoModel.from_config(config, attn_implementation="lmrt")
mask = torch.ones(2, 6, dtype=torch.long)
mask[0, :2] = 0
model(torch.randint(0, 97, (2, 6)), attention_mask=mask)
assert model.config._attn_implementation == "lmrt"
assert calls == [True, True], calls  # both layers on lmrt, with the padding mask
assert not any(type(finder).__name__ == "_RegistrationHook" for finder in sys.meta_path), sys.meta_path
"""
IMPORT_ORDERS = {
    "lmrt-alone": "import sys\nimport lmrt\nassert not [m for m in sys.modules if m.startswith('transformers')]",
    # transformers (lazy) and its masking_utils before lmrt, modeling_utils after: one registration at once, one by
    # the hook.
    "transformers-first": "import transformers\nimport transformers.masking_utils\n" + USE_LMRT,
    # Both by the hook.
    "lmrt-first": "import lmrt\nimport transformers\n" + USE_LMRT,
    # Both at once.
    "modeling-utils-first": "from transformers import AutoModel\nimport transformers.modeling_utils\n" + USE_LMRT,
}


@pytest.fixture(scope="module")
def import_order_runs():
    # One thread each: four tiny runs at once on a few cores.
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    processes = {name: subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for name, code in IMPORT_ORDERS.items()}
    outputs = {name: process.communicate(timeout=120)[0] for name, process in processes.items()}
    return {name: (process.returncode, outputs[name]) for name, process in processes.items()}


@pytest.mark.parametrize("order", IMPORT_ORDERS)
def test_import_order(order, import_order_runs):
    returncode, output = import_order_runs[order]
    assert returncode == 0, output

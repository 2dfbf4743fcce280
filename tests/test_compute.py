"""The compute backend: device choice, meta-device building, KV-cache decoding, budgets."""

from __future__ import annotations

import pytest
import torch

from auditor.analysis.compute import (
    attach_device_io,
    compute_dtype,
    count_params,
    decode,
    probe_budget,
    resolve_device,
    storage_dtype,
)
from auditor.analysis.modeling import build_model, combine_into, spec_from_config
from auditor.errors import AnalysisError

LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 100, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
         "bos_token_id": 1, "eos_token_id": 2}


def _reference() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"})
    ref = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    return ref, {k: v.clone() for k, v in ref.state_dict().items()}


def test_meta_build_matches_plain_model_and_keeps_ties() -> None:
    ref, state = _reference()
    model = build_model(spec_from_config(LLAMA), state, device="cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.float32  # CPU computes in float32
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    assert torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-6)
    # in place: one working copy rewritten, never copied
    before = model.model.embed_tokens.weight.data_ptr()
    combine_into(model, [(0.5, state), (0.5, state)])
    assert model.model.embed_tokens.weight.data_ptr() == before


def test_kv_cache_decoding_equals_full_reruns() -> None:
    ref, state = _reference()
    model = build_model(spec_from_config(LLAMA), state, device="cpu")
    ids = torch.tensor([[1, 5, 7, 9], [1, 3, 4, 6]])
    fed: list[int] = []
    got = decode(model, ids, 6, lambda logits, _s: logits.argmax(-1), on_step=fed.append)
    want = ids
    for _ in range(6):
        nxt = ref(input_ids=want).logits[:, -1].argmax(-1)
        want = torch.cat([want, nxt[:, None]], dim=1)
    assert torch.equal(got, want)
    # the prompt once, then one new token per row per step
    assert fed == [ids.numel()] + [2] * 5


def test_device_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from auditor.settings import Settings

    monkeypatch.delenv("AUDITOR_DEVICE", raising=False)
    # the default picks CUDA when present (one setting, not overridden further down)
    assert Settings().device == "auto"
    monkeypatch.setenv("AUDITOR_DEVICE", "cpu")
    assert Settings().device == "cpu"
    assert resolve_device("cpu").type == "cpu"
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    if not torch.cuda.is_available():
        with pytest.raises(AnalysisError):
            resolve_device("cuda")
    with pytest.raises(AnalysisError):
        resolve_device("abacus")


def test_dtype_choice() -> None:
    assert storage_dtype(LLAMA) == torch.bfloat16
    assert storage_dtype({}) == torch.float32
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert compute_dtype(cuda, torch.bfloat16, n_params=10, host_budget=None) == torch.bfloat16
    assert compute_dtype(cpu, torch.bfloat16, n_params=10, host_budget=10**9) == torch.float32
    # a float32 copy that would not fit the host budget stays in the storage dtype
    assert compute_dtype(cpu, torch.bfloat16, n_params=10**9,
                         host_budget=10**9) == torch.bfloat16


def test_device_io_is_a_noop_on_cpu() -> None:
    layer = torch.nn.Linear(2, 2)
    attach_device_io(layer, torch.device("cpu"))
    assert not layer._forward_pre_hooks and not layer._forward_hooks


def test_probe_budget_scales_with_model_size() -> None:
    llama_1b = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256,
                "tie_word_embeddings": True}
    n = count_params(llama_1b)
    assert 1.1e9 < n < 1.4e9  # Llama-3.2-1B has 1.24B
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    small = probe_budget(n_params=count_params(LLAMA), device=cpu, planned_evaluations=80,
                         cpu_flops=4e12, gpu_flops=2e15)
    big_cpu = probe_budget(n_params=n, device=cpu, planned_evaluations=80,
                           cpu_flops=4e12, gpu_flops=2e15)
    big_gpu = probe_budget(n_params=n, device=gpu, planned_evaluations=80,
                           cpu_flops=4e12, gpu_flops=2e15)
    assert small == 4096 and big_gpu == 4096
    assert 48 <= big_cpu < 100


def test_backdoor_search_tokens_fit_the_compute_budget() -> None:
    """A tiny model keeps the full token cap; a 1B model's search shrinks to the FLOPs the
    CPU budget pays for (hours of tokens would otherwise be spent on 2 cores)."""
    from auditor.detectors.backdoor import search_tokens
    from auditor.settings import Settings

    settings = Settings(device="cpu")
    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 512,
            "intermediate_size": 64, "num_attention_heads": 4}
    assert search_tokens(settings, tiny) == settings.backdoor_max_tokens
    llama_1b = {"hidden_size": 2048, "num_hidden_layers": 16, "vocab_size": 128256,
                "intermediate_size": 8192, "num_attention_heads": 32,
                "num_key_value_heads": 8, "tie_word_embeddings": True}
    got = search_tokens(settings, llama_1b)
    params = count_params(llama_1b)
    assert 1.0e9 < params < 1.5e9
    assert got == int(settings.backdoor_cpu_flops / (2 * params))
    assert got < settings.backdoor_max_tokens / 100
    # a larger budget buys more, never beyond the token cap
    more = search_tokens(Settings(device="cpu",
                                  backdoor_cpu_flops=2 * settings.backdoor_cpu_flops), llama_1b)
    assert more == pytest.approx(2 * got, rel=1e-3)


def test_output_head_runs_on_a_contiguous_input() -> None:
    """With ``logits_to_keep`` the head's input is a strided slice; matmul then broadcast
    the head's weight per sequence (8 GB for 16 sequences at 1B). The built model's head
    sees a contiguous input, and the logits are those of the full pass."""
    _ref, state = _reference()
    model = build_model(spec_from_config(LLAMA), state, device="cpu")
    seen: list[bool] = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    ids = torch.randint(0, LLAMA["vocab_size"], (3, 7))
    with torch.no_grad():
        last = model(input_ids=ids, logits_to_keep=1).logits[:, -1]
        full = model(input_ids=ids).logits[:, -1]
    assert seen == [True, True]
    assert torch.allclose(last, full, atol=1e-5)

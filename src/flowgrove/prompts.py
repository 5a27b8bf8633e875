"""Prompt data: files (txt, jsonl, csv) with metadata for the rewards, and encoder-output caches.

A :class:`Prompt` is a ``str`` that carries its file's other columns in ``metadata`` (the text an OCR reward must
find, GenEval's object tags, ...), so every reward keeps the ``(images, prompts)`` contract and those that need
metadata read ``getattr(prompt, "metadata", {})``.

``flowgrove encode-prompts`` writes a policy's encoder outputs as sharded safetensors with an ``index.json``;
:class:`CachedPrompts` reads back only the rows a step needs (safetensors slices are memory-mapped), so a large
prompt set never sits in memory or on the GPU.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import torch
from torch import Tensor

from flowgrove.policies.base import Conditioning, FlowPolicy

INDEX = "index.json"
CACHE_FORMAT = "flowgrove-prompt-cache-1"
FIELDS = ("prompt_embeds", "pooled")  # the Conditioning fields, in order


class Prompt(str):
    """A prompt string with the metadata of its row (``metadata``: column -> value)."""

    metadata: dict[str, Any]

    def __new__(cls, text: str, metadata: Mapping[str, Any] | None = None) -> Prompt:
        obj = super().__new__(cls, text)
        obj.metadata = dict(metadata or {})
        return obj

    def __reduce__(self):  # keep the metadata through pickling (worker processes, torch.save)
        return (Prompt, (str(self), self.metadata))


def _bad(path: Path, line: int | None, what: str) -> ValueError:
    where = f"{path}:{line}" if line is not None else str(path)
    return ValueError(f"{where}: {what}")


def _from_record(record: Any, path: Path, line: int) -> Prompt:
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
        raise _bad(path, line, 'each row needs a non-empty "prompt" field (other fields become metadata for the rewards)')
    return Prompt(record["prompt"].strip(), {k: v for k, v in record.items() if k != "prompt"})


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts of a ``.txt`` (one per line), ``.jsonl`` (one object per line with ``"prompt"``) or ``.csv`` (a
    ``prompt`` column) file; every other field or column is kept as the prompt's metadata."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist; give a .txt, .jsonl or .csv file")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise _bad(path, number, f"not a JSON object ({err.msg}); write one object per line") from None
                prompts.append(_from_record(record, path, number))
    elif suffix == ".csv":
        rows = csv.DictReader(text.splitlines())
        if "prompt" not in (rows.fieldnames or []):
            raise _bad(path, 1, f"the header needs a 'prompt' column, got {rows.fieldnames}")
        prompts = [_from_record(row, path, number) for number, row in enumerate(rows, start=2)]
    elif suffix in (".txt", ""):
        prompts = [Prompt(line.strip()) for line in text.splitlines() if line.strip()]
    else:
        raise _bad(path, None, f"unknown prompt file type {suffix!r}; use .txt, .jsonl or .csv")
    if not prompts:
        raise _bad(path, None, "holds no prompts; write one prompt per line (txt), object (jsonl) or row (csv)")
    return prompts


# ---- where a step's conditioning comes from ----------------------------------------------------------------------
class PromptRows(Protocol):
    """Conditioning rows by prompt index (an in-memory encoding or a cache on disk)."""

    def rows(self, ids: Tensor) -> Conditioning:
        """Conditioning ``[N, ...]`` of the prompts ``ids`` ``[N]`` (may repeat), on the CPU or the device."""
        ...


@dataclass(frozen=True)
class EncodedPrompts:
    """Every prompt encoded once and kept (small prompt sets)."""

    cond: Conditioning

    def rows(self, ids: Tensor) -> Conditioning:
        return self.cond.select(ids)


class CachedPrompts:
    """Rows of an ``encode-prompts`` cache, read per request from memory-mapped safetensors shards."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.index = read_index(self.folder)
        self._starts = [shard["start"] for shard in self.index["shards"]]
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return int(self.index["num_prompts"])

    def prompts(self) -> list[Prompt]:
        return [Prompt(r["prompt"], r.get("metadata")) for r in self.index["prompts"]]

    def _shard(self, row: int) -> tuple[Any, int]:
        from bisect import bisect_right

        from safetensors import safe_open

        shard = self.index["shards"][bisect_right(self._starts, row) - 1]
        if shard["file"] not in self._handles:
            self._handles[shard["file"]] = safe_open(str(self.folder / shard["file"]), framework="pt")
        return self._handles[shard["file"]], row - shard["start"]

    def rows(self, ids: Tensor) -> Conditioning:
        n = len(self)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
            raise IndexError(f"prompt rows {ids.tolist()} outside the cache's {n} prompts ({self.folder})")
        parts: dict[str, list[Tensor]] = {f: [] for f in self.index["fields"]}
        for row in ids.tolist():
            handle, local = self._shard(row)
            for f in parts:
                parts[f].append(handle.get_slice(f)[local:local + 1])  # [1, ...]: only this row is read
        return Conditioning(**{f: torch.cat(v) for f, v in parts.items()})


# ---- writing a cache ---------------------------------------------------------------------------------------------
def read_index(folder: Path) -> dict:
    path = Path(folder) / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"data.cache={str(folder)!r} has no {INDEX}; write one with `flowgrove encode-prompts`")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg}); rewrite the cache with `flowgrove encode-prompts`") from None
    if index.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} is not a flowgrove prompt cache (format {index.get('format')!r}); "
                         "rewrite it with `flowgrove encode-prompts`")
    return index


def write_cache(policy: FlowPolicy, prompts: Sequence[Prompt], folder: str | Path, policy_name: str,
                batch: int = 16, shard_rows: int = 1024, fingerprint: Mapping[str, Any] | None = None) -> Path:
    """Encode ``prompts`` in batches of ``batch`` and write shards of ``shard_rows`` rows plus ``index.json``
    (written last, atomically: a cache without its index is not a cache)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards, fields = [], None
    for start in range(0, len(prompts), shard_rows):
        chunk = list(prompts[start:start + shard_rows])
        with torch.no_grad():
            parts = [policy.encode_prompts(chunk[i:i + batch]) for i in range(0, len(chunk), batch)]
        fields = [f for f in FIELDS if getattr(parts[0], f) is not None]
        tensors = {f: torch.cat([getattr(p, f) for p in parts]).cpu().contiguous() for f in fields}
        name = f"shard_{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / name))
        shards.append({"file": name, "start": start, "count": len(chunk)})
    index = {
        "format": CACHE_FORMAT, "policy": policy_name, "fingerprint": dict(fingerprint or {}), "fields": fields,
        "num_prompts": len(prompts), "shards": shards,
        "prompts": [{"prompt": str(p), "metadata": getattr(p, "metadata", {})} for p in prompts],
    }
    tmp = folder / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index))
    os.replace(tmp, folder / INDEX)
    return folder

"""Qwen3-MoE checkpoints: lossless conversion between the experts' on-disk layouts in constant memory, a loader
that reads any of them into a transformers 5.x model, and a fix for Trainer's resume (transformers#48805).

Layouts of one layer's experts (keys under ``…layers.L.mlp.``; E experts, I = moe_intermediate_size, H = hidden):

    per-expert  experts.{e}.gate_proj.weight [I, H], experts.{e}.up_proj.weight [I, H], experts.{e}.down_proj.weight
                [H, I]: what transformers 4.x writes, what 5.x writes too (``save_pretrained`` reverts its stacked
                parameters), and what serving engines and converters read
    stacked     experts.gate_up_proj [E, 2I, H] (each expert's gate rows first), experts.down_proj [E, H, I]:
                transformers 5.x's parameters as they are (``save_pretrained(save_original_format=False)``)
    fused       gate_proj.weight / up_proj.weight [E, I, H], down_proj.weight [E, H, I] (read only: the layout of
                woct0rdho's transformers-qwen3-moe-fused ``convert_model_to_fused``)
    merged      experts.gate_proj / experts.up_proj [E, I, H], experts.down_proj [E, H, I] (read only: VeOmni's
                ``moe_merge`` script)

transformers 5.x loads per-expert and stacked checkpoints alike; 4.x reads per-expert ones with a 4.x-style
config.json (``num_experts``, ``rope_theta``; ``config_for="transformers4"`` adds them). Every layout change is a
stacking, concatenation or slicing along the leading dimensions, so each output tensor is a concatenation of byte
ranges of the input files: conversion plans those ranges from the safetensors headers, then copies bytes in
16 MiB chunks into shards written as safetensors writes them. Nothing is rounded (round trips are bit-exact) and
memory does not grow with the model, its shards or its layers. Every other tensor and file is copied unchanged.
"""

import dataclasses
import json
import math
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

__all__ = ["LAYOUTS", "convert_checkpoint", "detect_layout", "fix_trainer_resume", "load_checkpoint_into_model",
           "read_checkpoint"]

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PROJS = ("gate", "up", "down")
LAYOUTS = ("per-expert", "stacked", "fused", "merged")
WRITABLE = ("per-expert", "stacked")

# key -> (layout, layer prefix ending in "mlp.", projection, expert index or None); fused keys need a 3-D tensor
_PATTERNS = (
    ("per-expert", re.compile(r"^(?P<prefix>.*\bmlp\.)experts\.(?P<expert>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")),
    ("stacked", re.compile(r"^(?P<prefix>.*\bmlp\.)experts\.(?P<proj>gate_up|down)_proj$")),
    ("merged", re.compile(r"^(?P<prefix>.*\bmlp\.)experts\.(?P<proj>gate|up|down)_proj$")),
    ("fused", re.compile(r"^(?P<prefix>.*\bmlp\.)(?P<proj>gate|up|down)_proj\.weight$")),
)


# safetensors dtype names -> (bytes per element, torch dtype name)
_DTYPES = {"BOOL": (1, "bool"), "U8": (1, "uint8"), "I8": (1, "int8"), "F8_E4M3": (1, "float8_e4m3fn"),
           "F8_E5M2": (1, "float8_e5m2"), "I16": (2, "int16"), "U16": (2, "uint16"), "F16": (2, "float16"),
           "BF16": (2, "bfloat16"), "I32": (4, "int32"), "U32": (4, "uint32"), "F32": (4, "float32"),
           "I64": (8, "int64"), "U64": (8, "uint64"), "F64": (8, "float64")}
_COPY_CHUNK = 16 << 20  # bytes copied at a time


@dataclasses.dataclass
class _Entry:
    """One tensor of an input file: where its bytes are, and what it is."""

    key: str
    file: Path
    dtype: str
    shape: tuple
    start: int  # absolute byte offsets in the file
    end: int
    layout: str | None = None  # None: not an expert tensor (copied as it is)
    prefix: str = ""
    proj: str = ""
    expert: int | None = None

    def block(self, index, first_row=0, rows=None):
        """(file, start, end) of ``self[index, first_row:first_row + rows]`` (a contiguous block), or of the whole
        tensor when ``index`` is None."""
        if index is None:
            return self.file, self.start, self.end
        rows = self.shape[1] if rows is None else rows
        row_bytes = (self.end - self.start) // (self.shape[0] * self.shape[1])
        start = self.start + (index * self.shape[1] + first_row) * row_bytes
        return self.file, start, start + rows * row_bytes


@dataclasses.dataclass
class _Output:
    """One output tensor: dtype, shape and the input byte ranges whose concatenation is its data."""

    key: str
    dtype: str
    shape: tuple
    ranges: list

    @property
    def nbytes(self):
        return sum(end - start for _, start, end in self.ranges)


def _parse_size(size) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "200KB" (decimal) or "4GiB" (binary)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read shard size {size!r}; use bytes or e.g. '5GB', '500MB', '4GiB'")
    number, unit, binary = match.groups()
    return int(float(number) * (1024 if binary else 1000) ** " KMGT".index(unit.upper() or " "))


def _shard_files(folder: Path) -> list[Path]:
    if (folder / SAFE_INDEX).exists():
        weight_map = json.loads((folder / SAFE_INDEX).read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / SAFE_WEIGHTS).exists():
        return [folder / SAFE_WEIGHTS]
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise FileNotFoundError(
        f"{folder}: no {SAFE_WEIGHTS} or {SAFE_INDEX} (found: {', '.join(found) or 'nothing'}); only safetensors "
        "checkpoints are supported (convert .bin checkpoints with transformers first)"
    )


def _read_header(file: Path):
    """(tensors {key: (dtype, shape, start, end)} with absolute offsets, metadata) of a safetensors file."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    metadata = header.pop("__metadata__", None)
    base = 8 + size
    return {k: (v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0], base + v["data_offsets"][1])
            for k, v in header.items()}, metadata


def _scan(folder: Path) -> list[_Entry]:
    """Every tensor of the checkpoint (headers only), in file and offset order, classified by layout."""
    entries = []
    for file in _shard_files(folder):
        header, _ = _read_header(file)
        for key, (dtype, shape, start, end) in sorted(header.items(), key=lambda kv: kv[1][2]):
            if dtype not in _DTYPES:
                raise ValueError(f"{file}: tensor {key} has dtype {dtype}, which this converter does not know")
            entry = _Entry(key, file, dtype, shape, start, end)
            for layout, pattern in _PATTERNS:
                match = pattern.match(key)
                if match and (layout != "fused" or len(shape) == 3):
                    entry.layout, entry.prefix, entry.proj = layout, match["prefix"], match["proj"]
                    entry.expert = int(match["expert"]) if layout == "per-expert" else None
                    break
            entries.append(entry)
    merged = {e.prefix for e in entries if e.layout == "merged"}
    for e in entries:  # experts.down_proj is the same tensor in the stacked and the merged layout
        if e.layout == "stacked" and e.proj == "down" and e.prefix in merged:
            e.layout = "merged"
    return entries


def detect_layout(folder) -> str:
    """The experts' layout of a checkpoint folder (one of LAYOUTS); an error if it has none or several."""
    layouts = {e.layout for e in _scan(Path(folder)) if e.layout}
    if len(layouts) != 1:
        raise ValueError(f"{folder}: expected the experts in one layout of {LAYOUTS}, found "
                         f"{sorted(layouts) or 'no expert tensors'}")
    return layouts.pop()


def _layer_pieces(prefix, entries):
    """{proj: function(e) -> byte range of expert e's [out, in] matrix}, E, I, H and dtype of one layer's experts
    in any layout, after checking that they are complete and consistent."""
    layout = entries[0].layout
    if any(e.layout != layout for e in entries):
        raise ValueError(f"{prefix}: experts stored in several layouts ({sorted({e.layout for e in entries})})")
    if len({e.dtype for e in entries}) != 1:
        raise ValueError(f"{prefix}: expert tensors of several dtypes ({sorted({e.dtype for e in entries})})")
    if layout == "per-expert":
        by = {(e.expert, e.proj): e for e in entries}
        E = max(e.expert for e in entries) + 1
        missing = [f"experts.{x}.{p}_proj.weight" for x in range(E) for p in PROJS if (x, p) not in by]
        if missing:
            raise ValueError(f"{prefix}: per-expert tensors incomplete; missing {prefix}{missing[0]}"
                             f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}")
        I, H = by[(0, "gate")].shape
        shapes = {"gate": (I, H), "up": (I, H), "down": (H, I)}
        wrong = [e.key for e in entries if e.shape != shapes[e.proj]]
        pieces = {p: (lambda x, p=p: by[(x, p)].block(None)) for p in PROJS}
    else:
        by = {e.proj: e for e in entries}
        projs = ("gate_up", "down") if layout == "stacked" else PROJS
        missing = [f"{p}_proj" for p in projs if p not in by]
        if missing:
            raise ValueError(f"{prefix}: {layout} experts without {', '.join(missing)}")
        E, H, I = by["down"].shape
        if layout == "stacked":  # each expert's gate rows, then its up rows
            shapes = {"gate_up": (E, 2 * I, H), "down": (E, H, I)}
            pieces = {"gate": lambda x: by["gate_up"].block(x, 0, I), "up": lambda x: by["gate_up"].block(x, I, I),
                      "down": lambda x: by["down"].block(x)}
        else:
            shapes = {"gate": (E, I, H), "up": (E, I, H), "down": (E, H, I)}
            pieces = {p: (lambda x, p=p: by[p].block(x)) for p in PROJS}
        wrong = [e.key for e in entries if e.shape != shapes[e.proj]]
    if wrong:
        raise ValueError(f"{prefix}: expert tensors of inconsistent shapes: {wrong[:3]}")
    return pieces, E, I, H, entries[0].dtype


def _plan(entries, target):
    """The output tensors of ``target`` layout, in input order: experts of a layer where its first tensor was."""
    if target not in WRITABLE:
        raise ValueError(f"target layout must be one of {WRITABLE}, got {target!r}")
    layers = defaultdict(list)
    for e in entries:
        if e.layout:
            layers[e.prefix].append(e)
    outputs, done = [], set()
    for e in entries:
        if not e.layout:
            outputs.append(_Output(e.key, e.dtype, e.shape, [(e.file, e.start, e.end)]))
            continue
        if e.prefix in done:
            continue
        done.add(e.prefix)
        pieces, E, I, H, dtype = _layer_pieces(e.prefix, layers[e.prefix])
        if target == "stacked":
            outputs.append(_Output(f"{e.prefix}experts.gate_up_proj", dtype, (E, 2 * I, H),
                                   [pieces[p](x) for x in range(E) for p in ("gate", "up")]))
            outputs.append(_Output(f"{e.prefix}experts.down_proj", dtype, (E, H, I), [pieces["down"](x) for x in range(E)]))
        else:
            shapes = {"gate": (I, H), "up": (I, H), "down": (H, I)}
            outputs += [_Output(f"{e.prefix}experts.{x}.{p}_proj.weight", dtype, shapes[p], [pieces[p](x)])
                        for x in range(E) for p in PROJS]
    return outputs


class _Files:
    """Open input files, read by byte range."""

    def __init__(self):
        self.handles = {}

    def read_into(self, ranges, buffer: memoryview):
        offset = 0
        for file, start, end in ranges:
            f = self.handles.get(file) or self.handles.setdefault(file, open(file, "rb"))
            f.seek(start)
            view = buffer[offset:offset + end - start]
            while len(view):
                count = f.readinto(view[:_COPY_CHUNK])
                if not count:
                    raise EOFError(f"{file} ends before byte {end}")
                view = view[count:]
            offset += end - start

    def close(self):
        for f in self.handles.values():
            f.close()


def read_checkpoint(folder, target="stacked"):
    """Yield ``(key, tensor)`` for every tensor of a checkpoint folder with the experts in ``target`` layout
    ("stacked" or "per-expert"); each tensor is read straight from its byte ranges, one at a time."""
    import torch

    files = _Files()
    try:
        for out in _plan(_scan(Path(folder)), target):
            tensor = torch.empty(out.shape, dtype=getattr(torch, _DTYPES[out.dtype][1]))
            files.read_into(out.ranges, memoryview(tensor.view(-1).view(torch.uint8).numpy()))
            yield out.key, tensor
    finally:
        files.close()


def _write_shards(outputs, folder: Path, max_bytes: int, metadata) -> int:
    """Write ``outputs`` as safetensors shards of at most ``max_bytes`` (a larger tensor gets a shard of its own),
    named and indexed as transformers does (model.safetensors alone, or model-0000i-of-0000n.safetensors + index),
    copying the bytes in chunks: memory stays at one chunk whatever the tensor and shard sizes."""
    shards, size = [[]], 0
    for out in outputs:
        if shards[-1] and size + out.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(out)
        size += out.nbytes
    names = [SAFE_WEIGHTS] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    files, buffer = _Files(), memoryview(bytearray(_COPY_CHUNK))
    try:
        for name, shard in zip(names, shards):
            header, offset = {}, 0
            for out in shard:
                header[out.key] = {"dtype": out.dtype, "shape": list(out.shape), "data_offsets": [offset, offset + out.nbytes]}
                offset += out.nbytes
            if metadata:
                header["__metadata__"] = metadata
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-(8 + len(text)) % 8)  # the data starts 8-byte aligned, as safetensors writes it
            with open(folder / name, "wb") as f:
                f.write(len(text).to_bytes(8, "little") + text)
                for out in shard:
                    for file, start, end in out.ranges:
                        for chunk in range(start, end, _COPY_CHUNK):
                            stop = min(end, chunk + _COPY_CHUNK)
                            files.read_into([(file, chunk, stop)], buffer[:stop - chunk])
                            f.write(buffer[:stop - chunk])
    finally:
        files.close()
    if len(shards) > 1:
        weight_map = {out.key: name for name, shard in zip(names, shards) for out in shard}
        index = {"metadata": {"total_parameters": sum(math.prod(o.shape) for o in outputs),
                              "total_size": sum(o.nbytes for o in outputs)},
                 "weight_map": dict(sorted(weight_map.items()))}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return len(shards)


def _config_for(config: dict, target_version) -> dict:
    config = dict(config)
    architectures = config.get("architectures") or []
    config["architectures"] = [a.replace("Qwen3MoeFused", "Qwen3Moe") for a in architectures] or architectures
    if target_version == "transformers4":  # 4.x reads num_experts and rope_theta; 5.x reads both spellings
        if "num_experts" not in config and "num_local_experts" in config:
            config["num_experts"] = config["num_local_experts"]
        rope = config.get("rope_parameters") or {}
        if "rope_theta" not in config and "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]
    elif target_version is not None:
        raise ValueError(f"config_for must be None or 'transformers4', got {target_version!r}")
    return config


def convert_checkpoint(src, dst, *, to: str, max_shard_size=None, config_for=None) -> dict:
    """Write the checkpoint folder ``src`` to ``dst`` with its experts in layout ``to`` ("stacked" or
    "per-expert"). Each output tensor is the concatenation of byte ranges of the input files, copied in chunks, so
    memory stays at one chunk (16 MiB) whatever the model. ``max_shard_size`` (bytes or e.g. "5GB"; default: the
    largest input shard) bounds the output shards. Every other file of ``src`` (config, tokenizer, generation
    config) is copied; config.json also gets ``config_for="transformers4"``'s fields and loses a "Fused"
    architecture name. Returns a summary (layouts, shard counts, bytes)."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError("the destination must differ from the source folder")
    if to not in WRITABLE:
        raise ValueError(f"--to must be one of {WRITABLE}, got {to!r}")
    entries = _scan(src)
    layouts = {e.layout for e in entries if e.layout}
    if len(layouts) != 1:
        raise ValueError(f"{src}: expected the experts in one layout of {LAYOUTS}, found {sorted(layouts) or 'none'}")
    outputs = _plan(entries, to)  # validates every layer before anything is written
    files = _shard_files(src)
    _, metadata = _read_header(files[0])
    max_bytes = max(_tensor_bytes(f) for f in files) if max_shard_size is None else _parse_size(max_shard_size)
    dst.mkdir(parents=True, exist_ok=True)
    stale = [p.name for p in dst.iterdir() if p.name == SAFE_INDEX or p.suffix == ".safetensors"]
    if stale:
        raise FileExistsError(f"{dst} already holds weights ({', '.join(sorted(stale)[:3])}); choose an empty folder")
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != SAFE_INDEX:
            if path.name == "config.json":
                config = _config_for(json.loads(path.read_text()), config_for)
                (dst / path.name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            else:
                shutil.copy2(path, dst / path.name)
    shards = _write_shards(outputs, dst, max_bytes, metadata)
    return {"from": layouts.pop(), "to": to, "input_shards": len(files), "output_shards": shards,
            "bytes": sum(o.nbytes for o in outputs), "max_shard_bytes": max_bytes}


def _tensor_bytes(file: Path) -> int:
    """Bytes of the tensors in one safetensors file (its size less the header)."""
    with open(file, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return os.path.getsize(file) - 8 - header


def load_checkpoint_into_model(model, folder, *, strict=True):
    """Copy the weights of checkpoint ``folder`` (any layout) into ``model`` (transformers 5.x, stacked experts),
    one tensor at a time. Returns (missing keys, unexpected keys); with ``strict`` either is an error naming them."""
    import torch

    params = model.state_dict(keep_vars=True)
    loaded, unexpected = set(), []
    with torch.no_grad():
        for key, tensor in read_checkpoint(folder, "stacked"):
            if key not in params:
                unexpected.append(key)
                continue
            target = params[key]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"{folder}: {key} is {tuple(tensor.shape)} in the checkpoint, "
                                 f"{tuple(target.shape)} in the model")
            target.copy_(tensor)
            loaded.add(id(target))
    missing = sorted(k for k, v in params.items() if id(v) not in loaded)  # tied weights count as loaded
    if strict and (missing or unexpected):
        raise KeyError(f"{folder} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return missing, unexpected


def fix_trainer_resume(trainer):
    """Make ``trainer``'s resume (``train(resume_from_checkpoint=...)``) and ``load_best_model_at_end`` restore a
    Qwen3-MoE's experts. transformers 5.x's Trainer reads a checkpoint with ``model.load_state_dict(sd, False)``,
    which does not convert the per-expert keys that ``save_pretrained`` writes back to the stacked parameters, so
    the experts silently keep their current values (transformers#48805, open through 5.24). This replaces both
    loads of full-model checkpoints (single file or sharded safetensors) with ``load_checkpoint_into_model``;
    PEFT adapters, FSDP, DeepSpeed and SageMaker checkpoints keep Trainer's own path. Returns ``trainer``."""
    original_load, original_best = trainer._load_from_checkpoint, trainer._load_best_model

    def plain(folder, model):
        folder = Path(folder)
        return (not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled)
                and not hasattr(model, "peft_config")
                and ((folder / SAFE_WEIGHTS).exists() or (folder / SAFE_INDEX).exists()))

    def load_from_checkpoint(resume_from_checkpoint, model=None):
        model = trainer.model if model is None else model
        if not plain(resume_from_checkpoint, model):
            return original_load(resume_from_checkpoint, model=model)
        load_checkpoint_into_model(model, resume_from_checkpoint)

    def load_best_model():
        best = trainer.state.best_model_checkpoint
        if best is None or not plain(best, trainer.model):
            return original_best()
        load_checkpoint_into_model(trainer.model, best)

    trainer._load_from_checkpoint = load_from_checkpoint
    trainer._load_best_model = load_best_model
    return trainer

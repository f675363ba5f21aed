"""PEFT LoRA adapters on Qwen3-MoE experts: the stacked form ↔ the per-expert form, both ways, without loss.

    stacked     what PEFT writes on transformers 5.x (``target_parameters``; one ``ParamWrapper`` per 3-D weight):
                …mlp.experts[.base_layer].lora_A.weight [R·E, in] (rows of expert e: e·R … e·R+R-1) and
                …lora_B.weight [out, R·E] (column j·E + e: rank j of expert e); gate_up_proj's wrapper sits under
                down_proj's (``base_layer.``) when both are adapted. ΔW_e = s · B_e · A_e.
    per-expert  what transformers 4.x + PEFT write (``target_modules`` gate_proj / up_proj / down_proj):
                …mlp.experts.{e}.{gate,up,down}_proj.lora_A.weight [r, in] and .lora_B.weight [out, r]; the form
                serving engines and GGUF converters read.

stacked → per-expert: down_proj maps one to one. gate_up_proj's ΔW = s·B·A splits by rows: gate takes B's first I
rows, up the rest. When B_e is block-diagonal ([[B_gate, 0], [0, B_up]], what per-expert adapters become on 5.x,
rank 2r), gate and up get their own rank-r halves of A and B; otherwise both share A_e (rank R), exactly.
per-expert → stacked: when gate and up share A_e bit for bit (the case above) it is kept once (rank r); otherwise
A = [A_gate; A_up] and B = [[B_gate, 0], [0, B_up]] (rank r_gate + r_up, alpha scaled to keep s), as PEFT's own
loader builds it. So every round trip returns the same tensors bit for bit, and the merged weights of both forms
agree. Ranks and alphas travel through ``r`` / ``lora_alpha`` and, where a projection differs, ``rank_pattern`` /
``alpha_pattern``. An adapter file is read and written whole (it is one safetensors file).
"""

import json
import math
import re
import shutil
from collections import defaultdict
from pathlib import Path

__all__ = ["convert_adapter", "detect_adapter_layout"]

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
EXPERT_PARAMS = {"gate_up_proj", "down_proj"}
EXPERT_MODULES = ("gate_proj", "up_proj", "down_proj")

_PER_EXPERT = re.compile(r"^(?P<prefix>.*\bmlp\.experts\.)(?P<expert>\d+)\.(?P<proj>gate|up|down)_proj\."
                         r"(?P<ab>lora_[AB])\.weight$")
_STACKED = re.compile(r"^(?P<prefix>.*\bmlp\.experts\.)(?P<depth>(?:base_layer\.)*)(?P<ab>lora_[AB])\.weight$")


def _is_expert_target(name) -> bool:
    return name.rsplit(".", 1)[-1] in EXPERT_PARAMS and (name.count(".") == 0 or ".experts." in f".{name}")


def detect_adapter_layout(folder) -> str:
    """"stacked" or "per-expert" for a PEFT adapter folder; an error if it has no LoRA on the experts."""
    from safetensors import safe_open

    folder = Path(folder)
    if not (folder / CONFIG).exists() or not (folder / WEIGHTS).exists():
        raise FileNotFoundError(f"{folder}: a PEFT adapter folder has {CONFIG} and {WEIGHTS}")
    with safe_open(folder / WEIGHTS, framework="pt") as f:
        keys = list(f.keys())
    config = json.loads((folder / CONFIG).read_text())
    if any(_is_expert_target(t) for t in config.get("target_parameters") or []) and any(_STACKED.match(k) for k in keys):
        return "stacked"
    if any(_PER_EXPERT.match(k) for k in keys):
        return "per-expert"
    raise ValueError(f"{folder}: no LoRA on Qwen3-MoE experts (neither target_parameters gate_up_proj/down_proj "
                     "nor per-expert gate_proj/up_proj/down_proj weights)")


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (first key whose regex matches a dotted suffix of ``name``)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _scale(alpha, rank, rslora) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _alpha_for(scale_alpha, scale_rank, rank, rslora):
    """The alpha that gives rank ``rank`` the scale alpha/rank of (scale_alpha, scale_rank): exact in integers."""
    value = scale_alpha * (math.sqrt(rank / scale_rank) if rslora else rank / scale_rank)
    return int(value) if float(value).is_integer() else value


class _Factors:
    """One projection's LoRA of one layer: per expert (A_e [r, in], B_e [out, r]), its rank and alpha."""

    def __init__(self, a_list, b_list, rank, alpha):
        self.a, self.b, self.rank, self.alpha = a_list, b_list, rank, alpha


def _read_stacked(tensors, config):
    """{layer prefix: {"gate_up"|"down": _Factors}} of a stacked adapter."""
    r, alpha = config["r"], config["lora_alpha"]
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    found = defaultdict(lambda: defaultdict(dict))  # prefix -> depth -> {"lora_A": t, "lora_B": t}
    for key, tensor in tensors.items():
        match = _STACKED.match(key)
        if match:
            found[match["prefix"]][len(match["depth"]) // len("base_layer.")][match["ab"]] = tensor
    layers = {}
    for prefix, wrappers in found.items():
        by_shape = {}
        for pair in wrappers.values():
            if set(pair) != {"lora_A", "lora_B"}:
                raise ValueError(f"{prefix}: a stacked LoRA needs lora_A and lora_B, found {sorted(pair)}")
            by_shape[(pair["lora_A"].shape[1], pair["lora_B"].shape[0])] = pair
        dims = list(by_shape)
        # gate_up: in = H, out = 2I; down: in = I, out = H  (down's out is gate_up's in; never the other way round)
        if len(dims) == 2:
            (_, out0), (in1, _) = dims
            names = {dims[0]: "down", dims[1]: "gate_up"} if out0 == in1 else {dims[0]: "gate_up", dims[1]: "down"}
        else:
            module = ".".join(p for p in config.get("target_parameters") or [] if _is_expert_target(p))
            names = {dims[0]: "gate_up" if "gate_up_proj" in module else "down"}
        layer = {}
        model_prefix = prefix.removeprefix("base_model.model.")
        for dim, name in names.items():
            pair = by_shape[dim]
            full_name = f"{model_prefix}{name}_proj"
            rank = _pattern_value(ranks, full_name, r)
            rows = pair["lora_A"].shape[0]
            if rows % rank or pair["lora_B"].shape[1] != rows:
                raise ValueError(f"{prefix}{name}_proj: lora_A {tuple(pair['lora_A'].shape)} and lora_B "
                                 f"{tuple(pair['lora_B'].shape)} do not fit rank {rank} × experts")
            experts = rows // rank
            a = list(pair["lora_A"].reshape(experts, rank, -1).unbind(0))
            b = list(pair["lora_B"].reshape(pair["lora_B"].shape[0], rank, experts).permute(2, 0, 1).unbind(0))
            layer[name] = _Factors(a, b, rank, _pattern_value(alphas, full_name, alpha))
        layers[prefix] = layer
    return layers


def _read_per_expert(tensors, config):
    """{layer prefix: {"gate"|"up"|"down": _Factors}} of a per-expert adapter."""
    r, alpha = config["r"], config["lora_alpha"]
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    found = defaultdict(lambda: defaultdict(dict))  # (prefix, proj) -> expert -> {"lora_A": t, "lora_B": t}
    for key, tensor in tensors.items():
        match = _PER_EXPERT.match(key)
        if match:
            found[(match["prefix"], match["proj"])][int(match["expert"])][match["ab"]] = tensor
    layers = defaultdict(dict)
    for (prefix, proj), experts in found.items():
        if sorted(experts) != list(range(len(experts))) or any(set(p) != {"lora_A", "lora_B"} for p in experts.values()):
            raise ValueError(f"{prefix}*.{proj}_proj: per-expert LoRA incomplete (experts {sorted(experts)})")
        a = [experts[e]["lora_A"] for e in range(len(experts))]
        b = [experts[e]["lora_B"] for e in range(len(experts))]
        name = f"{prefix.removeprefix('base_model.model.')}0.{proj}_proj"
        layers[prefix][proj] = _Factors(a, b, a[0].shape[0], _pattern_value(alphas, name, alpha))
        if _pattern_value(ranks, name, r) != a[0].shape[0]:
            raise ValueError(f"{name}: rank {a[0].shape[0]} in the weights, {_pattern_value(ranks, name, r)} in "
                             f"{CONFIG}")
    return layers


def _stacked_to_per_expert(layer, rslora, base_rank):
    out = {}
    if "down" in layer:
        out["down"] = layer["down"]
    if "gate_up" in layer:
        f = layer["gate_up"]
        inter = f.b[0].shape[0] // 2
        half = f.rank // 2
        all_zero = all(not b.any() for b in f.b)
        block_diagonal = f.rank % 2 == 0 and all(
            not b[:inter, half:].any() and not b[inter:, :half].any() for b in f.b)
        # an all-zero B (an untrained adapter) is read as block-diagonal when its rank is twice the base rank
        if block_diagonal and (not all_zero or f.rank == 2 * base_rank):
            alpha = _alpha_for(f.alpha, f.rank, half, rslora)
            out["gate"] = _Factors([a[:half] for a in f.a], [b[:inter, :half] for b in f.b], half, alpha)
            out["up"] = _Factors([a[half:] for a in f.a], [b[inter:, half:] for b in f.b], half, alpha)
        else:
            out["gate"] = _Factors(f.a, [b[:inter] for b in f.b], f.rank, f.alpha)
            out["up"] = _Factors(f.a, [b[inter:] for b in f.b], f.rank, f.alpha)
    return out


def _per_expert_to_stacked(layer, rslora, where):
    import torch

    out = {}
    if "down" in layer:
        out["down"] = layer["down"]
    if ("gate" in layer) != ("up" in layer):
        raise ValueError(f"{where}: gate_proj and up_proj are fused into gate_up_proj on transformers 5.x; a LoRA on "
                         "only one of them has no stacked form")
    if "gate" in layer:
        g, u = layer["gate"], layer["up"]
        if not math.isclose(_scale(g.alpha, g.rank, rslora), _scale(u.alpha, u.rank, rslora), rel_tol=1e-12):
            raise ValueError(f"{where}: gate_proj and up_proj LoRA scales differ; a stacked gate_up_proj LoRA has "
                             "one scale")
        if g.rank == u.rank and all(torch.equal(x, y) for x, y in zip(g.a, u.a)):
            out["gate_up"] = _Factors(g.a, [torch.cat([x, y]) for x, y in zip(g.b, u.b)], g.rank, g.alpha)
        else:
            rank = g.rank + u.rank
            out["gate_up"] = _Factors([torch.cat([x, y]) for x, y in zip(g.a, u.a)],
                                      [torch.block_diag(x, y) for x, y in zip(g.b, u.b)], rank,
                                      _alpha_for(g.alpha, g.rank, rank, rslora))
    return out


def convert_adapter(src, dst, *, to: str) -> dict:
    """Write the PEFT adapter folder ``src`` to ``dst`` with its expert LoRA in form ``to`` ("per-expert" or
    "stacked"); other LoRA weights (attention, router) and files are copied unchanged. Returns a summary."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if to not in ("per-expert", "stacked"):
        raise ValueError(f"--to must be 'per-expert' or 'stacked', got {to!r}")
    if src.resolve() == dst.resolve():
        raise ValueError("the destination must differ from the source folder")
    source = detect_adapter_layout(src)
    config = json.loads((src / CONFIG).read_text())
    if isinstance(config.get("target_modules"), str):
        raise ValueError(f"{src / CONFIG}: target_modules is a regular expression ({config['target_modules']!r}); "
                         "convert handles a list of module names: list them and convert again")
    rslora = bool(config.get("use_rslora"))
    with safe_open(src / WEIGHTS, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    pattern = _PER_EXPERT if source == "per-expert" else _STACKED
    expert_keys = {k for k in tensors if pattern.match(k)}
    layers = (_read_per_expert if source == "per-expert" else _read_stacked)(tensors, config)
    out = {k: v for k, v in tensors.items() if k not in expert_keys}
    projections = {}
    for prefix, layer in layers.items():
        if source == to:
            converted = layer
        elif to == "per-expert":
            converted = _stacked_to_per_expert(layer, rslora, config["r"])
        else:
            converted = _per_expert_to_stacked(layer, rslora, prefix)
        projections.update({name: (f.rank, f.alpha) for name, f in converted.items()})
        for name, f in converted.items():
            if to == "per-expert":
                for e, (a, b) in enumerate(zip(f.a, f.b)):
                    out[f"{prefix}{e}.{name}_proj.lora_A.weight"] = a.clone(memory_format=torch.contiguous_format)
                    out[f"{prefix}{e}.{name}_proj.lora_B.weight"] = b.clone(memory_format=torch.contiguous_format)
            else:
                depth = "base_layer." if name == "gate_up" and "down" in converted else ""
                out[f"{prefix}{depth}lora_A.weight"] = torch.cat(f.a).contiguous()
                out[f"{prefix}{depth}lora_B.weight"] = torch.stack(f.b, dim=2).flatten(1).contiguous()
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and path.name not in (CONFIG, WEIGHTS):
            shutil.copy2(path, dst / path.name)
    save_file(out, dst / WEIGHTS, metadata=metadata)
    (dst / CONFIG).write_text(json.dumps(_config_for(config, to, projections), indent=2, sort_keys=True) + "\n")
    return {"from": source, "to": to, "layers": len(layers),
            "projections": {name: {"rank": rank, "alpha": alpha} for name, (rank, alpha) in projections.items()}}


def _config_for(config, to, projections):
    """adapter_config.json for the new form: targets, and rank/alpha patterns where a projection differs from
    (r, lora_alpha)."""
    config = dict(config)
    r, alpha = config["r"], config["lora_alpha"]
    targets = list(config.get("target_modules") or [])
    parameters = [t for t in config.get("target_parameters") or [] if not _is_expert_target(t)]
    expert_pattern = re.compile(r"(gate_up_proj|gate_proj|up_proj|down_proj)\)?\$?$")
    ranks = {k: v for k, v in (config.get("rank_pattern") or {}).items() if not expert_pattern.search(k)}
    alphas = {k: v for k, v in (config.get("alpha_pattern") or {}).items() if not expert_pattern.search(k)}
    for name, (rank, proj_alpha) in projections.items():
        key = rf".*\.{name}_proj" if to == "stacked" else rf"{name}_proj"
        if rank != r:
            ranks[key] = rank
        if proj_alpha != alpha:
            alphas[key] = proj_alpha
    if to == "stacked":
        targets = [t for t in targets if t not in EXPERT_MODULES]
        parameters += sorted(f"mlp.experts.{name}_proj" for name in projections)
    else:
        targets = sorted(set(targets) | {f"{name}_proj" for name in projections})
    config.update(target_modules=sorted(set(targets)), target_parameters=parameters or None, rank_pattern=ranks,
                  alpha_pattern=alphas)
    return config

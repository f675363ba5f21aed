"""Launch configurations of the kernels: defaults, the candidates the autotuner times, and the tuner.

Every GPU launch asks ``choose(kind, key, dtype, launch)`` for its block sizes and launch options:

- autotuning on (default on CUDA): the first launch of a (kind, key) times each candidate of ``CANDIDATES[kind]``
  (pruned: none whose BLOCK_N is twice the output width) with ``triton.testing.do_bench``, keeps the fastest for the rest of the process and logs the choice once.
  ``key`` holds the problem sizes and the rows per expert rounded up to a power of two, so a training run with
  a fixed sequence length tunes during its first step only (``tune`` in functional.py tunes ahead of time);
- ``QWEN3_MOE_FUSED_AUTOTUNE=0``: the defaults (``CANDIDATES[kind][0]``, from benchmarks/sweep_configs.py on an
  H100), with no timing; results are then bit-identical across processes, which tuned choices need not be
  (another BLOCK_K sums the fp32 products in another order; every candidate is tested against the reference);
- ``QWEN3_MOE_FUSED_AUTOTUNE_CACHE=file.json``: choices are read from the file at first use and written back
  after each tuning, so later processes skip the timing and reuse the same configs;
- inside CUDA-graph capture, where timing is impossible, the cached choice or the default;
- the Triton interpreter: small blocks (``INTERPRETER``), unless a test forces a config with ``forced``.

BLOCK_K is given for 2-byte dtypes and shrinks for wider ones so the shared-memory stages keep their size. The
M-tile height of the tile-table kernels (gate_up, grouped_gemm, dgrad) is ``block_m_for``'s, which the routing
table is built for, unless a dgrad config names a lower BLOCK_M dividing it (each routing tile is then split,
no table rebuilt); wgrad has its own BLOCK_M.
"""

import contextlib
import json
import logging
import os

import torch

logger = logging.getLogger(__name__)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _config(BLOCK_N, BLOCK_K, num_warps, num_stages, **extra):
    return dict(extra, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=num_warps, num_stages=num_stages)


CANDIDATES = {  # the first of each list is the default
    "gate_up": [_config(128, 64, 8, 4), _config(64, 64, 4, 4), _config(128, 64, 8, 3), _config(64, 128, 4, 3)],
    # 4-bit weights (their own kinds: the tiles' decoding changes what fits; tests/hopper_compile.py compiles
    # every candidate for sm_90 and reports its shared memory)
    # (the H200's best at T = 2048 first: benchmarks/results/2026-12-03_h200_sweep_nf4_2048.log)
    "gate_up_4bit": [_config(64, 64, 4, 4), _config(128, 64, 4, 3), _config(128, 64, 8, 4), _config(64, 64, 8, 3)],
    "grouped_gemm": [_config(256, 64, 8, 4), _config(128, 64, 8, 4), _config(128, 64, 4, 4), _config(256, 64, 8, 3)],
    # 4-bit weights: tiles whose columns lie in one 64-element block along the weight's contiguous dimension (dX
    # reads W1 [E, 2I, H] with H as its columns): wider tiles need a scale per element, more shared memory than an
    # SM has (measured on the H200: every grouped_gemm config above failed for dX)
    "grouped_gemm_4bit": [_config(64, 64, 4, 4), _config(128, 64, 8, 4), _config(64, 64, 8, 4), _config(64, 64, 4, 3)],
    "thin": [_config(16, 128, 4, 3), _config(16, 64, 4, 4), _config(16, 256, 4, 2), _config(16, 64, 2, 4)],
    "dgrad": [_config(64, 64, 8, 4, BLOCK_M=64), _config(64, 64, 8, 4), _config(64, 128, 8, 3),
              _config(128, 128, 8, 3)],
    "wgrad": [_config(128, 64, 8, 4, BLOCK_M=128), _config(256, 64, 8, 4, BLOCK_M=128),
              _config(128, 128, 8, 3, BLOCK_M=128), _config(128, 64, 8, 3, BLOCK_M=128)],
}
INTERPRETER = dict(BLOCK_N=32, BLOCK_K=32)  # plus BLOCK_M=32 for wgrad, 8 for dgrad (split routing tiles)
_INTERPRETER_M = {"wgrad": 32, "dgrad": 8}

_chosen: dict = {}  # (kind, key...) -> config, this process's choices
_forced: dict = {}  # kind -> config, set by ``forced``
_loaded_file = None


def block_m_for(num_rows: int, num_experts: int) -> int:
    """M-tile height shared by the routing tables and every M-tiled kernel of one call."""
    if _INTERPRET:
        return 16
    return 128 if num_rows >= 256 * num_experts else 64


def max_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    """Entries of the routing's tile table: every M-tile of the E experts and the dropped pairs fits."""
    return num_rows // block_m + min(num_experts + 1, num_rows)


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for host code (grids, buffer sizes): ``triton.cdiv`` is a constexpr function, whose wrapper costs
    more host time than the division (~25 host calls per experts fwd+bwd)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ n (n ≥ 1), for host code (as ``cdiv``)."""
    return 1 << (n - 1).bit_length()


def rows_bucket(num_rows: int, num_experts: int) -> int:
    """Rows per expert rounded up to a power of two: the part of a tuning key that follows the batch size."""
    return next_power_of_2(max(1, num_rows // max(1, num_experts)))


def enabled() -> bool:
    """The switch ``QWEN3_MOE_FUSED_AUTOTUNE`` (on unless "0"). Under the interpreter nothing is timed anyway."""
    return os.environ.get("QWEN3_MOE_FUSED_AUTOTUNE", "1") != "0"


@contextlib.contextmanager
def forced(**configs):
    """Within the block, kernel kind -> config (a CANDIDATES entry) is used as is, without timing (tests)."""
    saved = dict(_forced)
    _forced.update(configs)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)


_splits: dict = {}  # (id(config), dtype, thin_n) -> (config, its split): the config is held, so its id stays its own


def _split(config, dtype, thin_n=None):
    """(meta-parameters: block sizes and the like, launch options) of a config for ``dtype`` operands (made once per
    config; not to be mutated)."""
    cached = _splits.get((id(config), dtype, thin_n))
    if cached is not None and cached[0] is config:
        return cached[1]
    blocks = {k: v for k, v in config.items() if not k.startswith("num_")}  # the kernel's meta-parameters
    launch = {k: v for k, v in config.items() if k.startswith("num_")}
    blocks["BLOCK_K"] = max(16, blocks["BLOCK_K"] * 2 // dtype.itemsize)
    if thin_n is not None:  # LoRA's thin products: one column block of the rank's width
        blocks["BLOCK_N"] = max(16, next_power_of_2(thin_n))
    _splits[(id(config), dtype, thin_n)] = config, (blocks, launch)
    return blocks, launch


def _cache_file():
    return os.environ.get("QWEN3_MOE_FUSED_AUTOTUNE_CACHE")


def _load_file():
    global _loaded_file
    path = _cache_file()
    if path == _loaded_file:
        return
    _loaded_file = path
    if path and os.path.exists(path):
        with open(path) as f:
            for entry in json.load(f):
                _chosen.setdefault(tuple(entry["key"]), entry["config"])


def _save_file():
    path = _cache_file()
    if path:
        entries = [{"key": list(key), "config": config} for key, config in _chosen.items()]
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(entries, f, indent=1)
        os.replace(tmp, path)


def choose(kind, key, dtype, launch, n, thin_n=None):
    """Launch the kernel ``kind`` through ``launch(blocks, launch_options)`` with the config for ``key``; returns
    what ``launch`` returns. ``n``: the output columns (candidates with BLOCK_N ≥ 2n are not timed); ``thin_n``:
    the N of a LoRA thin product, which sets BLOCK_N."""
    if _INTERPRET:
        config = _forced.get(kind)
        if config is None:
            blocks = dict(INTERPRETER, **({"BLOCK_M": _INTERPRETER_M[kind]} if kind in _INTERPRETER_M else {}))
            if thin_n is not None:
                blocks["BLOCK_N"] = max(16, next_power_of_2(thin_n))
            return launch(blocks, {})
        return launch(*_split(config, dtype, thin_n))
    if kind in _forced:
        return launch(*_split(_forced[kind], dtype, thin_n))
    full_key = (kind, str(dtype).removeprefix("torch."), *key)
    if not enabled():
        return launch(*_split(CANDIDATES[kind][0], dtype, thin_n))
    _load_file()
    if full_key not in _chosen and torch.cuda.is_current_stream_capturing():
        return launch(*_split(CANDIDATES[kind][0], dtype, thin_n))
    config = select(kind, full_key, n, lambda config: _time(launch, _split(config, dtype, thin_n)))
    return launch(*_split(config, dtype, thin_n))


def _time(launch, split):
    """Median milliseconds of one launch with these block sizes and options, or None where they do not fit the GPU."""
    import triton

    try:
        return triton.testing.do_bench(lambda: launch(*split), warmup=5, rep=25, return_mode="median")
    except triton.runtime.errors.OutOfResources:  # e.g. shared memory of a smaller GPU
        return None


def select(kind, full_key, n, time):
    """The config of ``kind`` for ``full_key``: this process's choice or the cache file's, else the fastest candidate
    by ``time(config)`` (milliseconds, or None for one that does not fit), which is kept and written to the cache
    file. Candidates with BLOCK_N ≥ 2n are not timed (tiles mostly past the last column)."""
    _load_file()
    config = _chosen.get(full_key)
    if config is not None:
        return config
    fitting = [c for c in CANDIDATES[kind] if c["BLOCK_N"] < 2 * n] or \
        [min(CANDIDATES[kind], key=lambda c: c["BLOCK_N"])]
    timings = [(ms, c) for c in fitting if (ms := time(c)) is not None]
    if not timings:
        raise RuntimeError(f"qwen3-moe-fused: no launch config of kernel {kind} fits this GPU ({full_key})")
    ms, config = min(timings, key=lambda item: item[0])
    _chosen[full_key] = config
    logger.info("qwen3-moe-fused autotune %s: %s, %.3f ms (candidates: %s)", full_key, config, ms,
                ", ".join(f"{t:.3f}" for t, _ in timings))
    _save_file()
    return config

"""transformers 4.57 next to the tested 5.x: installed once into a private folder and run in a subprocess.

4.57 needs huggingface_hub < 1.0 and tokenizers < 0.23, which cannot share an environment with 5.x, so the three
are installed with pip into their own folder (cached between runs under ~/.cache/qwen3-moe-fused) and put first
on the subprocess's PYTHONPATH; torch, safetensors and PEFT come from the test environment. The installed
``kernels`` (0.17) does not import with that huggingface_hub, and 4.57 imports it when present, so the subprocess
hides it.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import private_packages

PACKAGES = ("transformers==4.57.1", "huggingface_hub==0.36.0", "tokenizers==0.22.1")
_PRELUDE = "import sys, json\nsys.modules['kernels'] = None  # kernels 0.17 needs huggingface_hub >= 1\n"


def install(cache_root=None) -> Path:
    """The folder holding transformers 4.57.1 (installed on first use); raises RuntimeError with pip's output."""
    return private_packages.install("transformers-4.57.1", PACKAGES, cache_root)


def run(target: Path, code: str, **inputs):
    """Run ``code`` under transformers 4.57 with ``inputs`` bound as variables (JSON-serialisable); the code sets
    ``result`` (JSON-serialisable), which is returned."""
    script = _PRELUDE + f"globals().update(json.loads({json.dumps(json.dumps(inputs))}))\n" + textwrap.dedent(code) \
        + "\nprint('@@RESULT@@' + json.dumps(result))\n"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    if result.returncode:
        raise AssertionError(f"transformers 4.57 subprocess failed:\n{result.stderr[-3000:]}")
    line = next(line for line in reversed(result.stdout.splitlines()) if line.startswith("@@RESULT@@"))
    return json.loads(line.removeprefix("@@RESULT@@"))

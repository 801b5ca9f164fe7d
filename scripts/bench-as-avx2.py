"""Run `isoconv ARGS...` as if this CPU had AVX2 but no AVX-512: aten's kernels (ATEN_CPU_CAPABILITY), oneDNN's
(ONEDNN_MAX_CPU_ISA), inductor's generated code (it follows ATEN_CPU_CAPABILITY) and isoconv's C kernels (built with
-march=x86-64-v3 into their own cache entry) all use AVX2 code. For estimating speed on an AVX2-only machine from
one that has AVX-512; the memory system and clock are still this machine's, so it is an estimate, not a measurement
on such a machine.

    python scripts/bench-as-avx2.py bench --models cm-vanilla --amps off ...
"""
import importlib
import os
import sys

os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"

import torch  # noqa: E402  (after the variables above, which torch reads at import)

from isoconv import cli  # noqa: E402

AVX2_TARGET = ("-march=x86-64-v3",)  # after -march=native, so it wins

for name in ("isoconv.models.depthwise", "isoconv.models.act_norm"):
    try:
        library = importlib.import_module(name).native
    except (ImportError, AttributeError):  # trees before the C kernels
        continue
    library.flags = library.flags + AVX2_TARGET

print(f"emulating an AVX2-only CPU: aten {torch.backends.cpu.get_cpu_capability()}, "
      f"ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']}, C kernels {' '.join(AVX2_TARGET)}", flush=True)
sys.exit(cli.main(sys.argv[1:]))

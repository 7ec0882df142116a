"""Memory of the real models' architectures as the pipeline loads them, float32 vs bfloat16, on this machine.

Builds the random-weight real-size checkpoints of :mod:`mmasr.demo.real_size` (Whisper small, CLIP ViT-B/32,
SmolLM3 at its real width with 2 of its 36 layers, HuBERT base, BERT base, AST base), then loads each one
in a fresh process through the pipeline's own loader (``mmasr.models.loading``, ``models.dtype``) and reads
every weight once (weights in the checkpoint's own dtype stay memory-mapped until read). Reported per model
and dtype: parameters, the parameters' and buffers' bytes, the process's peak RSS and, for scale, the RSS of
a process that only imported torch and transformers. The full 36-layer SmolLM3-3B is not built (it would
need ~12 GB of disk and RAM per dtype); its row is computed from the configuration (parameters x bytes).

    python benchmarks/real_size.py [--out results/real_size_memory.json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if (REPO / "src" / "mmasr").is_dir():
    sys.path.insert(0, str(REPO / "src"))

from mmasr.io import write_json  # noqa: E402

# params ``models`` key -> (loader, what the table calls it)
MODELS = {"whisper": ("load_whisper", "Whisper small (small.en layout)"),
          "clip": ("load_clip", "CLIP ViT-B/32"),
          "lm": ("load_lm", "SmolLM3 (real width, 2 of 36 layers)"),
          "audio_encoder": ("load_audio_encoder", "HuBERT base"),
          "text_encoder": ("load_text_encoder", "BERT base"),
          "ast": ("load_audio_encoder", "AST base")}
DTYPES = ("float32", "bfloat16")

PROBE = """
import json, sys, torch
from mmasr.memory import peak_rss_bytes, proc_status_bytes
from mmasr.models import loading
torch.set_num_threads(1)
def status(field):  # MB
    return proc_status_bytes(field) / 2**20
out = {{"baseline_rss_mb": peak_rss_bytes() / 2**20}}
if {folder!r}:
    bundle = getattr(loading, {loader!r})({folder!r}, device="cpu", dtype={dtype!r})
    with torch.no_grad():
        touched = sum(float(p.float().sum()) for p in bundle.model.parameters())  # read every weight once
    out.update(parameters=loading.parameter_count(bundle.model), dtype=str(bundle.model.dtype).removeprefix("torch."),
               model_mb=loading.model_memory_bytes(bundle.model) / 2**20, peak_rss_mb=peak_rss_bytes() / 2**20,
               finite=bool(torch.isfinite(torch.tensor(touched))), anon_mb=status("RssAnon"), file_mb=status("RssFile"))
print(json.dumps(out))
"""


def probe(folder: str, loader: str, dtype: str) -> dict:
    """Load one checkpoint in a fresh process (so the peak RSS is its own) and report its memory."""
    code = PROBE.format(folder=folder, loader=loader, dtype=dtype)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stored_dtype(folder: Path) -> str:
    """The dtype of the checkpoint's (first) weight in its safetensors file."""
    from safetensors import safe_open

    with safe_open(str(next(folder.glob("*.safetensors"))), "pt") as f:
        return str(f.get_slice(next(iter(f.keys()))).get_dtype()).lower().replace("f32", "float32").replace("bf16", "bfloat16")


def computed_smollm3() -> dict:
    from mmasr.models.published import PUBLISHED, count_parameters, model_class

    n = count_parameters(PUBLISHED["smollm3-3b"].config(), model_class("smollm3-3b"))
    return {"parameters": n, "float32_model_mb": n * 4 / 2**20, "bfloat16_model_mb": n * 2 / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "real_size_memory.json")
    parser.add_argument("--keep", type=Path, default=None, help="build the checkpoints here and keep them")
    args = parser.parse_args(argv)

    from mmasr.demo.real_size import build_real_size

    with tempfile.TemporaryDirectory(prefix="mmasr-real-size-") as tmp:
        root = args.keep or Path(tmp)
        print(f"building the real-size checkpoints in {root} ...", flush=True)
        dirs = build_real_size(root, tuple(MODELS))
        baseline = probe("", "", "float32")["baseline_rss_mb"]
        rows = []
        for key, (loader, label) in MODELS.items():
            for dtype in DTYPES:
                r = probe(str(dirs[key]), loader, dtype)
                assert r["finite"] and r["dtype"] == dtype, (key, dtype, r)
                rows.append({"model": label, "key": key, "stored": stored_dtype(dirs[key]), **r})
                print(f"{label:40s} {dtype:9s} {r['parameters'] / 1e6:8.1f} M  model {r['model_mb']:8.1f} MB  "
                      f"peak RSS {r['peak_rss_mb']:8.1f} MB (anonymous {r['anon_mb']:.0f}, file {r['file_mb']:.0f})",
                      flush=True)
    full = computed_smollm3()
    result = {"device": "cpu", "torch_threads": 1, "baseline_rss_mb": baseline, "models": rows,
              "smollm3_3b_computed": full}
    write_json(args.out, result)
    print(f"\nimports alone (torch + transformers + mmasr): {baseline:.0f} MB peak RSS")
    print("| model | parameters | stored as | load dtype | parameters + buffers | peak RSS | then resident: "
          "anonymous / file-backed |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['parameters'] / 1e6:.1f} M | {r['stored']} | {r['dtype']} | {r['model_mb']:.0f} MB | "
              f"{r['peak_rss_mb']:.0f} MB | {r['anon_mb']:.0f} / {r['file_mb']:.0f} MB |")
    for dtype in DTYPES:
        print(f"| SmolLM3-3B, all 36 layers (computed, not loaded) | {full['parameters'] / 1e9:.2f} B | bfloat16 | "
              f"{dtype} | {full[f'{dtype}_model_mb'] / 1024:.1f} GB | - | - |")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

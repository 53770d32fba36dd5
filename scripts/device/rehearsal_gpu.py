"""The Scout rehearsal through the notebooks on one GPU (device tool): params/scout-rehearsal.yaml, with local files.

``python scripts/device/rehearsal_gpu.py OUT [--rows 500 --heldout 20 --new-tokens 1200 --bench-limit 0 --steps 0]``

The device reaches no Hub, so what the rehearsal would download is made here: a folder with Scout's config.json
(``Llama4Config``: ``medtune.llama4.scout_text_config`` and Scout's vision tower) and the real Llama 4 tokenizer
(carried gzipped in .carry/llama4-tok), and the profile points at the carried rows and benchmark files
(.carry/data: ../shared's medical-o1 rows, MedQA, PubMedQA). Everything else is scout-rehearsal.yaml as published;
the arguments shrink the workload to fit one device call (0: the profile's own value). Then
``medtune.pipeline.run_all`` runs 00-07 and OUT gets the run's metrics.json (with its per-notebook resources
table), config.yaml and executed notebooks, and ``rehearsal.json`` (what was changed, exit status).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CARRY = ROOT / ".carry"
# Scout's vision tower (config.json of meta-llama/Llama-4-Scout-17B-16E-Instruct); the rehearsal builds it too.
SCOUT_VISION = dict(hidden_size=1408, image_size=336, intermediate_size=5632, num_attention_heads=16,
                    num_hidden_layers=34, patch_size=14, pixel_shuffle_ratio=0.5, projector_input_dim=4096,
                    projector_output_dim=4096, vision_output_dim=4096, rope_theta=10000, norm_eps=1e-5)


def scout_folder(folder: Path) -> Path:
    """config.json of Scout's architecture and the real Llama 4 tokenizer: what a rehearsal downloads."""
    from transformers import Llama4Config

    from medtune.llama4 import scout_text_config

    text = scout_text_config(pad_token_id=201134, eos_token_id=[200001, 200007, 200008], bos_token_id=200000)
    conf = Llama4Config(text_config=text.to_dict(), vision_config=SCOUT_VISION)
    conf.architectures = ["Llama4ForConditionalGeneration"]
    folder.mkdir(parents=True, exist_ok=True)
    conf.save_pretrained(folder)
    tok = CARRY / "llama4-tok"
    with gzip.open(tok / "tokenizer.json.gz", "rb") as src, open(folder / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    shutil.copy(CARRY / "llama4-tok" / "tokenizer_config.json", folder / "tokenizer_config.json")
    return folder


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--rows", type=int, default=0)
    ap.add_argument("--heldout", type=int, default=0)
    ap.add_argument("--new-tokens", type=int, default=0)
    ap.add_argument("--bench-limit", type=int, default=0)
    ap.add_argument("--steps", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    folder = scout_folder(Path("/tmp/scout-rehearsal-config"))
    d = yaml.safe_load((ROOT / "params" / "scout-rehearsal.yaml").read_text())
    data = CARRY / "data"
    changes = dict(model=str(folder), source="local", dataset=str(data / "medical_o1_sft_en_604.jsonl"),
                   benchmarks={"medqa": str(data / "medqa_usmle_4op_test.jsonl"),
                               "pubmedqa": str(data / "pubmedqa_pqa_labeled_test.jsonl")})
    for key, value in (("max_rows", args.rows), ("heldout_size", args.heldout), ("max_new_tokens", args.new_tokens),
                       ("benchmark_limit", args.bench_limit)):
        if value:
            changes[key] = value
    d.update(changes)
    if args.steps:
        d["sft"] = {**d["sft"], "max_steps": args.steps}
        changes["sft.max_steps"] = args.steps
    params = Path("/tmp/scout-rehearsal-device.yaml")
    params.write_text(yaml.safe_dump(d, sort_keys=False))
    report = {"changes": changes, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    from medtune import pipeline
    from medtune.settings.runs import outputs_root

    status = 0
    t0 = time.perf_counter()
    try:
        pipeline.run_all(params)
    except Exception as err:  # the executed notebook shows the failing cell; record it and copy what exists
        report["error"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
        status = 1
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    runs = sorted(p for p in outputs_root().iterdir() if p.is_dir())
    if runs:
        run = runs[-1]
        report["run"] = run.name
        for name in ("metrics.json", "config.yaml", "train_log.json", "loss_curve.png"):
            if (run / name).is_file():
                shutil.copy(run / name, args.out / name)
        if (run / "notebooks").is_dir():
            shutil.copytree(run / "notebooks", args.out / "notebooks", dirs_exist_ok=True)
    (args.out / "rehearsal.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())

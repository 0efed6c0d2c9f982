"""One GPU call's headline figures in one JSON, read from the stage files ``gpu_run.sh`` wrote in that call.

    python benchmarks/summarize_run.py RUN_DIR --out summary.json

RUN_DIR holds the call's ``e2e_recommended.json`` or ``e2e.json`` (``bench_e2e.py --compile``), ``profile.json`` and
``profile_recommended.json`` (``profile_step.py``, eager and ``--recommended``), ``gdn_core.json``,
``conv.json`` and ``largest_9b.json``; a missing file leaves its fields out (and is named under ``missing``).
Every number is copied from those files, none computed here except ratios named as such.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PROFILE_FIELDS = ("step_wall_ms", "gpu_busy_ms", "gpu_idle_ms", "gpu_idle_ms_unprofiled", "by_category_ms")


def _load(run: Path, name: str, missing: list[str]) -> dict | None:
    path = run / name
    if not path.exists():
        missing.append(name)
        return None
    return json.loads(path.read_text())


def summarize(run: Path) -> dict:
    missing: list[str] = []
    name = "e2e_recommended.json" if (run / "e2e_recommended.json").exists() else "e2e.json"
    e2e, conv = _load(run, name, missing), _load(run, "conv.json", missing)
    profiles = {"eager": _load(run, "profile.json", missing)}
    profiles["recommended"] = _load(run, "profile_recommended.json", missing)
    gdn, largest = _load(run, "gdn_core.json", missing), _load(run, "largest_9b.json", missing)
    out: dict = {"env": (e2e or gdn or {}).get("env", {}), "missing": missing}
    if e2e:
        block = e2e["e2e"]
        out["e2e"] = {
            "tokens": e2e["tokens"],
            "tokens_per_s": {m: v["tokens_per_s"] for m, v in block["modes"].items() if "tokens_per_s" in v},
            "errors": {m: v["error"] for m, v in block["modes"].items() if "error" in v},
            "peak_mem_GB": {m: v["peak_mem_GB"] for m, v in block["modes"].items() if "peak_mem_GB" in v},
            "vs_padded": block.get("vs_padded"),
            "vs_hf_packed": block.get("vs_hf_packed"),
            "recommended": block["recommended"],
            "speedup_vs_eager": block["speedup_vs_eager"],
            "mfu": block["mfu"],
            "mfu_eager": block["mfu_eager"],
            "mfu_formula": block["mfu_detail"]["formula"],
            "exact": block.get("exact", {}),
            "exact_eager": e2e.get("exact", {}),
        }
    out["profile"] = {}
    for name, data in profiles.items():
        if data and isinstance(data.get("profile"), dict) and "error" not in data["profile"]:
            out["profile"][name] = {k: data["profile"].get(k) for k in PROFILE_FIELDS} | {
                "forward_backward_s": data.get("step", {}).get("forward_backward_s"),
                "step_s": data.get("step", {}).get("step_s"),
                "mfu": data.get("mfu"),
            }
    if gdn:
        out["gdn_core"] = gdn.get("gdn_core", {})
    if conv:
        out["conv"] = {"floor_ms": conv.get("floor_ms"), "backends": conv.get("backends")}
    if largest:
        out["memory"] = {k: v for k, v in largest["memory"].items() if k.startswith("largest_row")}
        out["memory"]["setting"] = largest.get("setting")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    Path(args.out).write_text(json.dumps(summarize(args.run), indent=1) + "\n")


if __name__ == "__main__":
    main()

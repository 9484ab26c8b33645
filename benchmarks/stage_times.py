"""Wall time of each stage of a finished `python train.py` run, read off its run folder (nothing is rerun).

    python benchmarks/stage_times.py runs/cpu
    python benchmarks/stage_times.py runs/cpu --json times.json

Each stage ends when its last file is written, so the stage times are differences of file modification times:
    start        config.json (written before the base stage starts)
    A. base      the base's final checkpoint (state.json)
    B. losses    losses.safetensors (the automatic t window and the per-sample losses)
       groups    groups.safetensors
    C. head      each head's final checkpoint
    D. eval      summary.json (judges, sampling, judging)
The base and head rows also give the seconds per training step from their metrics.jsonl (the loop alone,
checkpoint writes included). Valid only for a run made in one go: a resumed or copied run folder has other times.
A benchmark: it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def final_checkpoint(stage: Path) -> Path | None:
    ckpts = sorted(p for p in stage.glob("ckpt-*") if (p / "state.json").is_file())
    return ckpts[-1] / "state.json" if ckpts else None


def seconds_per_step(stage: Path) -> float | None:
    lines = (stage / "metrics.jsonl").read_text().splitlines() if (stage / "metrics.jsonl").is_file() else []
    if len(lines) < 2:
        return None
    first, last = json.loads(lines[0]), json.loads(lines[-1])
    return (last["seconds"] - first["seconds"]) / (last["step"] - first["step"])


def stage_times(run: Path) -> dict:
    marks = [("start", run / "config.json"), ("A. base", final_checkpoint(run / "base")),
             ("B. losses", run / "losses.safetensors"), ("B. groups", run / "groups.safetensors")]
    marks += [(f"C. head {h}", final_checkpoint(run / h)) for h in ("invdiff", "oracle", "uniform")]
    marks += [("D. eval", run / "summary.json")]
    present = [(name, path.stat().st_mtime) for name, path in marks if path is not None and path.is_file()]
    if not present or present[0][0] != "start":
        raise SystemExit(f"{run} holds no config.json: not a train.py run folder")
    rows, previous = {}, present[0][1]
    for name, when in present[1:]:
        rows[name] = {"seconds": round(when - previous, 1)}
        stage = run / ("base" if name == "A. base" else name.split()[-1])
        if name.startswith(("A.", "C.")) and (per := seconds_per_step(stage)) is not None:
            rows[name]["seconds_per_step"] = round(per, 4)
        previous = when
    return {"run": str(run), "stages": rows, "total_seconds": round(previous - present[0][1], 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a run folder made by train.py in one go")
    p.add_argument("--json", type=Path, default=None, help="also write the table here")
    args = p.parse_args()
    if args.json and ((args.json.exists() and not args.json.is_file()) or not args.json.parent.is_dir()):
        raise SystemExit(f"error: --json {args.json}: pass a file path in an existing folder (a new or regular file)")
    times = stage_times(args.run)
    for name, row in times["stages"].items():
        per = f"  ({row['seconds_per_step']:.3f} s/step)" if "seconds_per_step" in row else ""
        print(f"{name:<18}{row['seconds'] // 60:4.0f} min {row['seconds'] % 60:4.0f} s{per}")
    total = times["total_seconds"]
    print(f"{'total':<18}{total // 60:4.0f} min {total % 60:4.0f} s")
    if args.json:
        args.json.write_text(json.dumps(times, indent=1) + "\n")


if __name__ == "__main__":
    main()

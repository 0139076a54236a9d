"""What one decode costs: seconds and peak RSS of `load_and_preprocess` on hostile and camera-size images.

Cases: the 78 KB 16-bit grey PNG of 6320 x 6320 from the serve-hardening issue (its `I;16` path went
through float64), a 32-bit float (`F`) TIFF, and a 12-MP camera-like JPEG in each decode mode. Every
case runs in a fresh child process (so the peak RSS is that case's alone), `--repeat` times, and the
median is printed as one JSON line per case. Run it with two interpreters side by side to compare code
versions (e.g. main's venv and a branch's), interleaved: the figures are only comparable on one machine.

    python benchmarks/decode_cost.py --repeat 5
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("gray16-40mp-png", "float-9mp-tiff", "camera-12mp-jpeg-exact", "camera-12mp-jpeg-fast")


def make(case: str, folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    if case.startswith("gray16"):
        side = 6320
        path = folder / "gray16.png"
        Image.frombytes("I;16", (side, side), bytes(2 * side * side)).save(path)
    elif case.startswith("float"):
        path = folder / "float.tif"
        ramp = np.linspace(0, 255, 3000 * 3000, dtype=np.float32).reshape(3000, 3000)
        Image.fromarray(ramp, "F").save(path)
    else:
        path = folder / "camera.jpg"
        rng = np.random.default_rng(0)
        small = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)  # textured, then detail noise at full size
        big = np.asarray(Image.fromarray(small).resize((4000, 3000), Image.Resampling.BICUBIC), np.int16)
        big = np.clip(big + rng.integers(-20, 21, big.shape, dtype=np.int16), 0, 255).astype(np.uint8)
        Image.fromarray(big).save(path, quality=90)
    return path


def run_one(case: str, path: Path) -> dict:
    """In this (child) process: time one decode (imports excluded)."""
    from cfvit_deploy.preprocessing import PreprocessConfig, load_and_preprocess

    pp = PreprocessConfig(crop_size=224, resize_size=256)
    kwargs = {"decode": "fast"} if case.endswith("-fast") else {}
    start = time.perf_counter()
    load_and_preprocess(path, pp, **kwargs)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child[0], Path(args.child[1]))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            path = make(case, Path(tmp))
            runs = []
            for _ in range(args.repeat):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", case, str(path)], capture_output=True, text=True, check=False
                )
                if out.returncode:
                    runs = [{"error": out.stderr.strip().splitlines()[-1]}]
                    break
                runs.append(json.loads(out.stdout))
            result: dict = {"case": case, "python": sys.executable, "file_kb": round(path.stat().st_size / 1024)}
            if "error" in runs[0]:
                result["error"] = runs[0]["error"]
            else:
                result["median_s"] = round(statistics.median(r["seconds"] for r in runs), 3)
                result["peak_rss_mb"] = round(statistics.median(r["peak_rss_mb"] for r in runs))
                result["runs_s"] = [round(r["seconds"], 3) for r in runs]
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""PyTorch eager cells (``--torch``): the only bench module that imports torch and the model.

The gated cell times ``CFViT.predict`` (the reference orchestration in PyTorch); the baseline cell
times ``fine_stage_dense`` (the plain ViT on all fine tokens). Threads are set like the ONNX cells'.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cfvit_deploy.extras import require
from cfvit_deploy.manifest import Manifest

from .schema import Cell
from .timing import eta_for_fine_fraction, timed_loop


def measure_torch(spec: dict[str, Any], cell: Cell, batches: list[np.ndarray]) -> dict[str, Any]:
    torch = require("torch", purpose="the --torch cells of cfvit bench")
    from cfvit_deploy.checkpoints import load_checkpoint
    from cfvit_deploy.model import confidence

    torch.set_num_threads(spec["threads"])
    manifest = Manifest.load(spec["export_dir"], verify=False)
    model = load_checkpoint(spec["checkpoint"], config=manifest.model)
    tensors = [torch.from_numpy(b) for b in batches]
    n, warmup, iterations, duration = len(tensors), spec["warmup"], spec["iterations"], spec["duration"]
    with torch.inference_mode():
        if cell.model == "baseline":
            times, _ = timed_loop(
                lambda i: model.fine_stage_dense(tensors[i % n], None), n, warmup, iterations, duration
            )
            return {"times": times}
        eta = cell.value
        if cell.gate == "fine_fraction":
            conf = torch.cat([confidence(model.coarse_stage(t).logits) for t in tensors]).numpy()
            eta = eta_for_fine_fraction(conf, float(cell.value))

        def call(i: int) -> tuple[None, None, None, int]:
            exited = model.predict(tensors[i % n], eta).exited
            return None, None, None, int(len(exited) - int(exited.sum()))

        if warmup:
            model.predict(tensors[0], 1.0)
        times, stages = timed_loop(call, n, max(warmup - 1, 0), iterations, duration)
    return {"times": times, "stages": stages, "eta": eta}

"""``single.onnx`` against PyTorch and against the pair (coarse.onnx -> gate -> fine.onnx), per input.

For η = 0 (every image exits), η = 1 (none does, barring a confidence of exactly 1.0), the validation's
η list (mixed batches) and a per-image η alternating 0 and 1 (a mixed batch whatever the confidences):
* the gate holds exactly as the graph defines it: ``exited == (confidence >= eta)`` in float32;
* the decisions agree with PyTorch's and the pair's (confidences within :data:`ETA_TIE` of η are ties);
* logits (coarse where exited, fine elsewhere), confidences and the refined patches agree with
  PyTorch's (the fp32 bound; reduced precision: the RMS criterion) and with the pair's;
* the rows that exited carry the documented fill (-1) in ``informative_idx``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtimes.pipeline import NOT_REFINED, CFViTPipeline

from .criteria import ETA_TIE, Checker, softmax_confidence


def _eta_cases(batch: int, etas: tuple[float, ...]) -> list[tuple[str, np.ndarray]]:
    cases = [(f"eta={e:g}", np.full(batch, e, np.float32)) for e in dict.fromkeys((0.0, 1.0, *etas))]
    alternating = np.resize(np.array([0.0, 1.0], np.float32), batch)
    cases.append(("eta alternating 0/1 per image", alternating))
    return cases


def compare_single(
    backend: Any, x: np.ndarray, etas: tuple[float, ...], ref: dict[str, np.ndarray], check: Checker
) -> None:
    """Check single.onnx on images `x`; `ref` holds PyTorch's coarse_logits, fine_logits and informative_idx."""
    conf_ref = softmax_confidence(ref["coarse_logits"]).astype(np.float32)
    pair = CFViTPipeline(backend, graph="pair")
    for label, eta in _eta_cases(len(x), etas):
        out = backend.run("single", {"images": x, "eta": eta})
        exited, conf = out["exited"].astype(bool), out["confidence"]
        tie = np.abs(conf_ref.astype(np.float64) - eta) < ETA_TIE
        check.rate(
            f"single graph: gate exited == (confidence >= eta) in float32 [{label}]",
            exited == (conf >= eta),
            1.0,
            "agreement rate",
        )
        check.exits(f"single graph: exit decision vs PyTorch [{label}]", conf, conf_ref, eta)
        check.close(f"single graph: confidence vs PyTorch [{label}]", conf, conf_ref)
        # PyTorch's answer for the single graph's own decisions (they agree but for ties)
        want = np.where(exited[:, None], ref["coarse_logits"], ref["fine_logits"])
        check.close(f"single graph: logits vs PyTorch [{label}]", out["logits"], want, logits=True)
        check.close(f"single graph: coarse_logits vs PyTorch [{label}]", out["coarse_logits"], ref["coarse_logits"])
        fine_rows = ~exited
        if fine_rows.any():
            check.patches(
                f"single graph: refined patches vs PyTorch [{label}]",
                out["informative_idx"][fine_rows],
                ref["informative_idx"][fine_rows],
                ref["global_attention"][fine_rows],
            )
        check.rate(
            f"single graph: informative_idx of exited rows is {NOT_REFINED} [{label}]",
            np.all(out["informative_idx"][exited] == NOT_REFINED, axis=1),
            1.0,
            "rows filled",
        )
        if np.all(eta == eta[0]):
            _against_pair(pair.run(x, float(eta[0])), out, exited, tie, label, check)


def _against_pair(
    result: Any, out: dict[str, np.ndarray], exited: np.ndarray, tie: np.ndarray, label: str, check: Checker
) -> None:
    """single.onnx against the pair at the same scalar η: same stage, same patches, logits within the bound."""
    same = exited == result.exited
    check.rate(f"single graph: same stage as the pair [{label}]", same | tie, 1.0, "agreement rate")
    rows = same & ~exited
    check.rate(
        f"single graph: same refined patches as the pair [{label}]",
        np.all(out["informative_idx"][rows] == result.informative_idx[rows], axis=1),
        1.0 if check.crit.exact else 0.0,
        "identical rows",
    )
    if same.any():
        check.close(
            f"single graph: logits vs the pair [{label}]", out["logits"][same], result.logits[same], logits=True
        )

"""The sticking-the-landing scoring pass: parameters detached by swapping them for
detached copies (the guides' way since issue 23) against the same pass run by
``torch.func.functional_call`` (the way before, refused under Pyro's JIT ELBOs).

For the default ``AutoRealNVP`` on two targets, after one SVI step: 7 alternating blocks
of 100 scoring passes (``log_prob`` of 4 draws, then ``backward``) and of 20
``SVI.step`` calls (``Trace_ELBO``, 4 vectorised particles) per implementation; the
minimum and the median over blocks, in ms per pass or step (on a loaded machine read the
minimum).

    python benchmarks/stl_pass.py
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_genext.infer import AutoRealNVP
from pyro_genext.infer import autoguide as ag
from pyro_genext.infer.targets import TARGETS


class _Scorer(torch.nn.Module):
    def __init__(self, flow: Any) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, z: torch.Tensor) -> Any:
        return self.flow._inverse_and_ladj(z)


def functional_call_log_prob(self: Any, value: torch.Tensor) -> torch.Tensor:
    """The scoring pass before issue 23."""
    (flow,) = self.transforms
    scorer = _Scorer(flow)
    fixed = {n: p.detach() for n, p in scorer.named_parameters()}
    x, ladj = torch.func.functional_call(scorer, fixed, (value,))
    return self.base_dist.log_prob(x) - ladj


def main() -> None:
    torch.set_num_threads(1)
    swap = ag._StickingTheLanding.log_prob
    impls = {"swap (issue 23)": swap, "functional_call": functional_call_log_prob}
    print(f"{'model':9s} {'STL pass':16s} {'score+backward ms':>24s} {'SVI.step ms':>22s}")
    for name in ("funnel", "logistic"):
        target = TARGETS[name]()
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoRealNVP(target.model)
        elbo = Trace_ELBO(num_particles=4, vectorize_particles=True)
        svi = SVI(target.model, guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
        svi.step(*target.args)
        post = guide.get_posterior(*target.args)
        z = post.rsample((4,)).detach().requires_grad_()
        res: dict[str, dict[str, list[float]]] = {k: {"score": [], "step": []} for k in impls}
        try:
            for _block in range(7):
                for k, f in impls.items():
                    ag._StickingTheLanding.log_prob = f  # type: ignore[method-assign]
                    t0 = time.perf_counter()
                    for _ in range(100):
                        post.log_prob(z).sum().backward()
                    res[k]["score"].append((time.perf_counter() - t0) * 10)
                    t0 = time.perf_counter()
                    for _ in range(20):
                        svi.step(*target.args)
                    res[k]["step"].append((time.perf_counter() - t0) * 50)
        finally:
            ag._StickingTheLanding.log_prob = swap  # type: ignore[method-assign]
        for k, r in res.items():
            sc, st = r["score"], r["step"]
            print(f"{name:9s} {k:16s} min {min(sc):6.3f} median {statistics.median(sc):6.3f} "
                  f"min {min(st):6.2f} median {statistics.median(st):6.2f}", flush=True)


if __name__ == "__main__":
    main()

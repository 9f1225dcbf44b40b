"""One rank of the two-rank gloo tests (tests/test_distributed.py), started with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set: statistics and an evaluation through the public functions, rank
0 writing what every rank computed to OUT (argv[1])."""

import dataclasses
import json
import sys

import torch
from safetensors.torch import save_file

from editfast.core import distributed as dist
from editfast.engine.engine import Engine
from editfast.eval.runner import EvalPlan
from editfast.methods.locate_then_edit.stats import second_moments
from editfast.methods.registry import resolve_hparams
from editfast.models.load import load_model

torch.set_num_threads(1)
out, layers, n_samples, tasks, limit = sys.argv[1], [1, 3], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
assert dist.init("cpu") and dist.world_size() == 2
lm = load_model("random:tiny-llama")
hp = resolve_hparams("memit", lm.spec, lm.model.config, {"mom2_n_samples": n_samples, "mom2_max_tokens": 64})
C = second_moments(lm, layers, hp, progress=False)


class Recording(Engine):
    """The engine, remembering which requests this rank answered and what it answered."""

    def run(self, requests):
        self.seen = list(requests)
        self.answers = super().run(requests)
        return self.answers


plan = EvalPlan.build(tasks, limit=limit, seed=0)
engine = Recording(lm, progress=False)
result = plan.run(lm, engine)
where = {id(r): i for i, r in enumerate(plan.pool)}
as_json = lambda a: a if isinstance(a, str) else dataclasses.astuple(a)
mine = [[where[id(r)] for r in engine.seen], [as_json(a) for a in engine.answers]]
shards = dist.gather_objects(mine)
if dist.is_main():
    save_file({f"layer{l}": c.contiguous() for l, c in C.items()}, f"{out}/stats.safetensors")
    with open(f"{out}/eval.json", "w") as f:
        json.dump({"result": result.to_json(), "shards": shards}, f)

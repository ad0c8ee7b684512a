"""The ``cofi`` command for ``torchrun`` in tests/training/test_distributed.py, with one fault put in
where ``COFI_TEST_FAULT`` says:

- ``gates-outside-ddp``: the negative control; CoFi's gates (log α, λ) are left out of DDP's
  gradient averaging, as if they were optimised outside the wrapped module;
- ``fail-rank-1``: process 1 raises at step 3 while process 0 goes on.
"""

import os
import sys

from cofi_kernels import cli
from cofi_kernels.pruning.cofi import loop
from cofi_kernels.training import distributed

FAULT = os.environ.get("COFI_TEST_FAULT")

if FAULT == "gates-outside-ddp":
    _wrap = distributed.World.wrap

    def _wrap_without_gates(self, module, *, varying):
        if self.distributed and isinstance(module, loop.CoFiLoss) and module.gates is not None:
            from torch.nn.parallel import DistributedDataParallel

            names = [f"gates.{n}" for n, _ in module.gates.named_parameters()]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
        return _wrap(self, module, varying=varying)

    distributed.World.wrap = _wrap_without_gates
elif FAULT == "fail-rank-1":
    _train_step = loop._CoFiRun.train_step

    def _failing_train_step(self, phase, step, b, part):
        if part.world.rank == 1 and step == 3:
            raise RuntimeError("injected failure of process 1 at step 3")
        return _train_step(self, phase, step, b, part)

    loop._CoFiRun.train_step = _failing_train_step
elif FAULT:
    raise SystemExit(f"unknown COFI_TEST_FAULT {FAULT!r}")

sys.exit(cli.main())

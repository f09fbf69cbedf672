"""Training entry point: TorchTitan's trainer with the hybrid train spec.

``python -m titan_hybrid.train --job.config_file train_configs/debug_cpu.toml``
(normally through ``run_train.sh``, which wraps torchrun).
"""

import gc

from torch.distributed.elastic.multiprocessing.errors import record

from titan_hybrid.lifetime import exit_with_launcher
from titan_hybrid.platform.cpu import configure_platform


@record  # the exception goes to torchrun's error file: titan_hybrid.run prints it as the job's cause
def main() -> None:
    exit_with_launcher()  # torchrun puts ranks in sessions of their own: no orphan may train on
    configure_platform()  # before TorchTitan builds its device handles
    from torchtitan.train import main as torchtitan_main

    from titan_hybrid.models.hybrid import train_spec
    from titan_hybrid.trainer import HybridTrainer

    train_spec.register()
    torchtitan_main(HybridTrainer)
    # The interpreter's last garbage collection would walk every object that torch, Dynamo and
    # Inductor made (a CPU debug run ended ~1 s later without this); the process ends next, and
    # refcounted objects (open files, the TensorBoard writer) are still released as it does.
    gc.freeze()


if __name__ == "__main__":
    main()

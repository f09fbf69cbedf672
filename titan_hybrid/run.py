"""torchrun, with the failure that ended the job printed once, and its cause as the last line.

``run_train.sh`` execs ``python -m titan_hybrid.run <torchrun arguments>``. torchrun itself
closes a failed job with a ``ChildFailedError`` block: its own traceback, then one per
failed rank (``error_file: <N/A>`` for a rank that did not record its exception), headed
by the rank it saw fail first, to the second, which is often a rank that only lost its
peer, or one that ``LOG_RANK`` hides. Here every rank records its exception with torch
elastic's ``@record`` (``titan_hybrid.train``); the root cause is the recorded failure
whose error file was written first (or a shown rank that raised the same exception type).
Its traceback is printed unless that rank's output is already shown, and then its
message, last.
"""

from __future__ import annotations

import os
import sys

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure


def _message(failure: ProcessFailure) -> str:
    """``Type: message`` of a recorded exception, else torchrun's text (e.g. the signal)."""
    message = failure.message
    return message["message"] if isinstance(message, dict) else message


def root_cause(error: ChildFailedError, shown_local_ranks: set[int] | None) -> tuple[int, ProcessFailure]:
    """The (global rank, failure) that came first: the earliest written error file, else torchrun's pick.

    When several ranks raised the same exception type (each saw the same fault), a rank whose
    output is shown is taken, so that its traceback is not printed twice.
    """
    recorded = {rank: f for rank, f in error.failures.items() if os.path.isfile(f.error_file)}
    if not recorded:
        return error.get_first_failure()
    first = min(recorded, key=lambda r: os.stat(recorded[r].error_file).st_mtime_ns)
    kind = _message(recorded[first]).split(":")[0]
    for rank, failure in sorted(recorded.items()):
        shown = shown_local_ranks is None or failure.local_rank in shown_local_ranks
        if shown and _message(failure).split(":")[0] == kind:
            return rank, failure
    return first, recorded[first]


def report(error: ChildFailedError, shown_local_ranks: set[int] | None) -> str:
    """What to print after a failed job: the root cause's traceback (if not shown already) and its message."""
    rank, failure = root_cause(error, shown_local_ranks)
    others = sorted(set(error.failures) - {rank})
    lines = [
        f"[titan-hybrid] the job failed on rank {rank} (local rank {failure.local_rank}, pid {failure.pid}, "
        f"exit code {failure.exitcode})" + (f"; ranks {others} ended with it" if others else "")
    ]
    message = failure.message
    callstack = message.get("extraInfo", {}).get("py_callstack") if isinstance(message, dict) else None
    if callstack and shown_local_ranks is not None and failure.local_rank not in shown_local_ranks:
        lines.append(f"[titan-hybrid] rank {rank}'s traceback (its output is not shown, LOG_RANK):")
        lines.append(callstack.rstrip())
    lines.append(f"[titan-hybrid] rank {rank}: {_message(failure)}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = torchrun.parse_args(argv)
    shown = {int(r) for r in args.local_ranks_filter.split(",")} if args.local_ranks_filter else None
    try:
        torchrun.run(args)
    except ChildFailedError as error:
        sys.stdout.flush()
        print(report(error, shown), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""bench.warm_start's reading of a run's log."""


def test_warm_start_reads_the_fla_import_time_from_the_log(caplog):
    """``ops.fla_kernels`` logs how long importing fla took; ``bench.warm_start`` reads it from the log."""
    import importlib
    import logging

    from bench.warm_start import IMPORTED_FLA
    from titan_hybrid.ops import fla_kernels

    with caplog.at_level(logging.INFO, logger=fla_kernels.__name__):
        importlib.reload(fla_kernels)  # imported once per process: run its body again for the line
    (record,) = [r for r in caplog.records if r.name == fla_kernels.__name__]
    assert float(IMPORTED_FLA.search(record.getMessage()).group(1)) >= 0.0

class ProcessGroupHCCL:
    """Only `Options` is reached (profiler_info.py's initialize_model_parallel wrapper); no
    `hccl_config` on it, so the wrapper leaves the options alone."""

    class Options:
        def __init__(self, *args, **kwargs):
            pass

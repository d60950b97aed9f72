"""The benchmark suite behind scripts/benchmark.py, one job per module:

    memory.py       peak memory of a phase (CUDA allocator peak, or sampled resident set size)
    configs.py      the composed config, datamodule and module of a family
    bare_loop.py    the bare PyTorch loop: the module's own loss functions, plain torch optimizers
    training.py     genbench through Lightning, timed alone or interleaved with the bare loop
    fast_paths.py   each speed switch against the default config, FLOPs and MFU
    evaluation.py   FID vs scipy sqrtm, extractor passes, sampling cost, sampler quality
    report.py       the Markdown of a result
"""

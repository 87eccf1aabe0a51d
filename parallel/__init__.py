"""parallel: data-parallel training of both implementations on torch.distributed (gloo, torchrun).

    parallel/sampler.py   the deterministic sharded sampler (NumPy only)
    parallel/dp.py        the glue: global-token loss weighting, ManualDP (one all-reduce over the
                          flat gradient buffer), ReferenceDP (DistributedDataParallel), the faults
    parallel/train.py     the trainer subclass tools/train.py uses under torchrun

torch is imported here; manual/ never imports this package (it must run without torch).
See docs/distributed.md.
"""

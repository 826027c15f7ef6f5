"""The machinery that serves the scripts and the research files at the top level; no network, loss or metric is here.

    checkpoint     save, load, export; the shipped checkpoints by name
    cli            the flags of the scripts that run a trained network, declared once
    curves         curves.png and TensorBoard
    datacache      the decoded training set in one memory-mapped file
    distributed    torchrun: ranks, gathering, weights in sync
    fast           faster forms of model.py's layers: same weights, same outputs
    files          outputs written whole, never over an input; folders and locks
    images         image files in and out, metadata kept
    onnx_export    --export to .onnx, and running it
    precision      --precision: what auto picks, autocast, loss scaling
    runs           a run's folder, log.csv, checkpoint format and stop signals
    upscale        tiled inference, exact at the seams
    video          infer.py on videos
    bench_tools    what benchmark.py and the two runs below share
    cache_study    benchmark.py --data_cache: the data cache's memory study
    machine_check  benchmark.py --check: a new machine's training and tiling in every precision

Modules here import each other relatively and the top level's modules (model, losses, metrics,
resize, dataset, training, utils) by name; none imports an entry script.
"""

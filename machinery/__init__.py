"""The machinery that serves the scripts and the research files at the top: nothing here is an experiment.

    checkpoint    save, load, export; the shipped checkpoints by name
    curves        curves.png and TensorBoard
    datacache     the decoded training set in one memory-mapped file
    distributed   torchrun: ranks, gathering, weights in sync
    files         outputs written whole, never over an input; folders and locks
    images        image files in and out, metadata kept
    onnx_export   --export to .onnx, and running it
    precision     --precision: what auto picks, autocast, loss scaling
    runs          a run's folder, its log.csv, and the stop signals that save it
    upscale       tiled inference, exact at the seams
    video         infer.py on videos

Modules here import each other relatively and import the top level's research files (model,
resize, metrics) and utils by name; nothing here imports an entry script.
"""

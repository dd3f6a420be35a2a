"""Data layer: the embedded default data, the stage-one webdataset stream, the stage-two HF datasets.

- `embedded`: generates the formula-driven pretraining shards (FractalDB-style) and the small real target set (digits).
- `shards`: the stage-one stream (webdataset shards, split by node and worker, exactly `steps` batches per rank).
- `target`: the stage-two map-style datasets (save_to_disk dirs, imagefolder dirs, hub names), k-shot subsets, loaders.
- `transforms`: torchvision v2 pipelines shared by both stages.
"""

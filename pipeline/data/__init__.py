"""Data layer: the embedded default data, the stage-one webdataset stream, the stage-two HF datasets.

- `embedded`: generates the formula-driven pretraining shards (FractalDB-style) and the small real target set (digits).
- `shards`: the stage-one stream (sources, rank/worker splits, bad data counted, exactly `steps` batches per rank).
- `sources`: shard bytes from local paths, http(s), hf://, s3://, gs:// with timeouts and bounded retries.
- `tarsamples`: tar shards -> raw samples with byte positions and an honest end status (complete/partial/failed).
- `position`: the stream's resumable position, as checkpoint-safe plain data.
- `augment`: stage one's fast augmentation (per-sample crop/flip on PIL, per-batch normalisation).
- `shardwriter`: HF datasets and image folders -> shards + `_info.json` (`transferline data shards`).
- `target`: the stage-two map-style datasets (save_to_disk dirs, imagefolder dirs, hub names), k-shot subsets, loaders.
- `transforms`: torchvision v2 pipelines shared by both stages.
"""

"""transferline: pretrain on webdataset shards, then fine-tune on a small target dataset."""

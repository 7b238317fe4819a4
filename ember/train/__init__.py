"""ember.train: the one training loop and what it needs.

    loss.py        pure loss functions: cross_entropy (fp32, ignore_index), chunked_cross_entropy, z_loss
    optim.py       AdamW with no decay on norms/biases/embeddings; lr_at(step, cfg) schedules (cosine, wsd,
                   constant) wrapped in LambdaLR
    loop.py        TrainConfig and Trainer: accumulation, clipping, eval, NaN stop/skip, MFU, checkpoints
                   (Trainer.train_step is one optimizer step: the unit benchmarks time)
    state.py       resumable training checkpoints (torch.distributed.checkpoint; any world size) and
                   export to the plain safetensors checkpoint (export_final, export_to_safetensors)
    log.py         metrics.jsonl writer, optional TensorBoard, run header (config.yaml, git SHA), progress line
    checkpoint.py  the plain checkpoint format: model.safetensors + ember.json (+ tokenizer/)
"""

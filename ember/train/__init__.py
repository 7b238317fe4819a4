"""ember.train: the one training loop and what it needs.

    loss.py        the loss contract (LossOutput: summed loss, weight, summed metrics; Objective), the LM
                   objective (LMLoss: plain or fused head + CE, z-loss) and pure losses (cross_entropy, ...)
    fused_loss.py  the fused head + cross-entropy kernel (imports nothing else from ember.train)
    optim.py       AdamW with no decay on norms/biases/embeddings; lr_at(step, cfg) schedules (cosine, wsd,
                   constant) wrapped in LambdaLR
    loop.py        TrainConfig and Trainer: the step's weighted normalisation, accumulation, clipping, eval,
                   NaN stop/skip, signal-safe stops, frozen models, MFU, checkpoints
    run.py         run plumbing every training recipe shares: torchrun relaunch, run dir, resume checks,
                   model on meta -> parallelize -> materialize -> optimizer -> Trainer, export
    state.py       resumable training checkpoints (torch.distributed.checkpoint; any world size) and
                   export to the plain safetensors checkpoint (export_final, export_to_safetensors)
    log.py         metrics.jsonl writer, optional TensorBoard, run header (config.yaml, git SHA), progress line
"""

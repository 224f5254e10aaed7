"""Fine-tuning: image classifiers on ImageFolders (see fromzero.finetune.images)."""

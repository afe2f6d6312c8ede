"""Fine-tuning orchestration: SFT data checks and the launcher behind ``finetune.sh``."""

"""Post-training: GPT-1 task fine-tuning, SFT, LoRA, reward models, PPO (RLHF) and DPO."""

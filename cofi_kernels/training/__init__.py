"""Layer 5: training runs (data, distillation losses, the run machinery, fine-tuning)."""

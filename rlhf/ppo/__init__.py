"""PPO with a per-token KL penalty: core.py (pure maths), rollout.py (sampling and scoring),
trainer.py (the loop)."""

"""Stage 2: reinforcement learning from the SFT checkpoint with verifiable rewards (GRPO and PPO on TRL).

    python launch.py stage=rl rl=grpo model.path=<sft checkpoint>
    python launch.py stage=rl rl=ppo model.path=<sft checkpoint> rl.verifier.path=<verifier>

Modules: `config` (schema), `data` (verifiable questions), `rewards` (format, rule verifier, model verifier),
`trainer` (the stage entry point, TRL GRPOTrainer driven by the config), `ppo` (PPO = GRPOTrainer + value
model + GAE, since TRL 1.16 has no PPOTrainer).
"""

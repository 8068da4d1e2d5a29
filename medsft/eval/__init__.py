"""Evaluation: medical MCQ benchmarks (English and Spanish) by generation, an honest scorer, HuatuoGPT-compat.

    medsft eval model=<preset or model.path=checkpoint> eval=<huatuo_o1|headqa_es|casimedicos_es|custom> ...

Modules: benchmarks (loaders -> EvalItem), generate (batched generation), format (## Thinking / ## Final
Response compliance), extract (what the model answered), compat (HuatuoGPT-o1's optimistic scorer), scorer,
report, runner (evaluate_benchmark for the training loop; run_evaluation for the CLI), config (the composed
`medsft eval` config). The command itself is medsft/cli/eval.py. torch and transformers only in generate/runner.
"""

from medsft.eval.format import FormatCheck, check_format, compliance_rate

__all__ = ["FormatCheck", "check_format", "compliance_rate"]

"""Evaluation: perplexity and bits per byte, multiple-choice log-likelihood tasks, greedy agreement.

from lmstack.eval import evaluate
evaluate("smollm2-135m-instruct", ["ppl", "mc"])
"""

from lmstack.eval.evaluate import evaluate

__all__ = ["evaluate"]

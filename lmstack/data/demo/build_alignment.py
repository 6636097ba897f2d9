"""Builds the alignment demo data shipped with lmstack (English and Chinese):

    python -m lmstack.data.demo.build_alignment   # rewrites preferences.jsonl, arithmetic*.jsonl here

preferences.jsonl  prompt/chosen/rejected pairs for `lmstack align dpo|rm`. The chosen reply is correct
                   and in the instruction set's house style (answer first, one short reason); the
                   rejected one is wrong (another capital, the wrong antonym, a wrong sum) or evasive
                   and rambling, so both accuracy and style separate them.
arithmetic.jsonl   the RL task for `lmstack align grpo`: {"prompt", "answer"} rows of small additions,
                   subtractions and multiplications whose replies must end with "Answer: N";
                   `lmstack.train.rewards` scores exact match on N and the format.
arithmetic_easy.jsonl  the same task on single-digit additions (all 81, in both languages), where
                   SmolLM2-135M knows the sums but often buries them in a rambling reply: GRPO's
                   accuracy gain shows within tens of steps.
Deterministic: the same files every time.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lmstack.data.demo.build_instructions import ANTONYMS, CAPITALS

EVASIVE_EN = "That is an interesting question with many possible answers, and it depends on how you look at it."
EVASIVE_ZH = "这是一个很有意思的问题，答案取决于很多因素，很难一概而论。"
ANSWER_FORMAT = "Reply with the result as 'Answer: N'."


def _capital_pairs() -> list[dict]:
    rows = []
    for i, (country, capital, country_zh, capital_zh) in enumerate(CAPITALS):
        wrong = CAPITALS[(i + 7) % len(CAPITALS)]  # another country's capital
        rows.append(
            {
                "prompt": f"What is the capital of {country}?",
                "chosen": f"{capital}. It is the capital city of {country}.",
                "rejected": f"{wrong[1]}. It is the capital city of {country}." if i % 2 else EVASIVE_EN,
            }
        )
        rows.append(
            {
                "prompt": f"{country_zh}的首都是哪里？",
                "chosen": f"{capital_zh}。它是{country_zh}的首都。",
                "rejected": f"{wrong[3]}。它是{country_zh}的首都。" if i % 2 == 0 else EVASIVE_ZH,
            }
        )
    return rows


def _antonym_pairs() -> list[dict]:
    rows = []
    for i, (word, opposite, word_zh, opposite_zh) in enumerate(ANTONYMS):
        wrong, wrong_zh = ANTONYMS[(i + 3) % len(ANTONYMS)][1], ANTONYMS[(i + 3) % len(ANTONYMS)][3]
        rows.append(
            {
                "prompt": f"What is the opposite of '{word}'?",
                "chosen": f"'{opposite}'. It means the reverse of '{word}'.",
                "rejected": f"'{wrong}'. It means the reverse of '{word}'." if i % 2 else EVASIVE_EN,
            }
        )
        rows.append(
            {
                "prompt": f"“{word_zh}”的反义词是什么？",
                "chosen": f"“{opposite_zh}”。它的意思与“{word_zh}”相反。",
                "rejected": f"“{wrong_zh}”。它的意思与“{word_zh}”相反。" if i % 2 == 0 else EVASIVE_ZH,
            }
        )
    return rows


def _sum_pairs(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        wrong = a + b + rng.choice([-10, -1, 1, 10])
        if i % 2:
            prompt, chosen = f"What is {a} plus {b}?", f"{a + b}. {a} + {b} = {a + b}."
            rejected = f"{wrong}. {a} + {b} = {wrong}."
        else:
            prompt, chosen = f"{a}加{b}等于多少？", f"{a + b}。{a} + {b} = {a + b}。"
            rejected = f"{wrong}。{a} + {b} = {wrong}。"
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def build_preferences() -> list[dict]:
    rng = random.Random(7)
    rows = _capital_pairs() + _antonym_pairs() + _sum_pairs(rng, 40)
    rng.shuffle(rows)
    return rows


def build_arithmetic(n: int = 400) -> list[dict]:
    """Small integer problems in both languages; the answer is the exact integer."""
    rng = random.Random(11)
    rows = []
    for i in range(n):
        op = rng.choice("+-*")
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(1, 50), rng.randint(1, 50))
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        if i % 2:
            prompt = f"What is {a} {op} {b}? {ANSWER_FORMAT}"
        else:
            word = {"+": "加", "-": "减", "*": "乘以"}[op]
            prompt = f"{a}{word}{b}等于多少？请用“Answer: N”的格式回答。"
        rows.append({"prompt": prompt, "answer": str(value)})
    return rows


def build_arithmetic_easy() -> list[dict]:
    """Every single-digit addition (1..9 + 1..9) once in each language, shuffled: 162 problems a 135M model
    mostly knows, so RL on them teaches the reply (a short "Answer: N") rather than arithmetic."""
    rows = []
    for a in range(1, 10):
        for b in range(1, 10):
            rows.append({"prompt": f"What is {a} + {b}? {ANSWER_FORMAT}", "answer": str(a + b)})
            rows.append({"prompt": f"{a}加{b}等于多少？请用“Answer: N”的格式回答。", "answer": str(a + b)})
    random.Random(13).shuffle(rows)
    return rows


def _write(rows: list[dict], name: str) -> None:
    from lmstack.utils.io import atomic_write_text

    out = Path(__file__).with_name(name)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{len(rows)} rows -> {out}")


def main() -> None:
    _write(build_preferences(), "preferences.jsonl")
    _write(build_arithmetic(), "arithmetic.jsonl")
    _write(build_arithmetic_easy(), "arithmetic_easy.jsonl")


if __name__ == "__main__":
    main()

"""Builds `instructions.jsonl`, the demo instruction set shipped with lmstack (English and Chinese).

    python -m lmstack.data.demo.build_instructions      # rewrites lmstack/data/demo/instructions.jsonl

Every answer is short, correct and in one house style (a direct answer, then one sentence of
reason), so a brief LoRA run visibly changes how a chat model replies. Facts are tabled here by
hand; the rows mix three formats (chat `messages`, Alpaca, ShareGPT) and some multi-turn
conversations, so the file exercises every reader. Deterministic: the same file every time.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# country, capital, 国家, 首都
CAPITALS = [
    ("France", "Paris", "法国", "巴黎"),
    ("Germany", "Berlin", "德国", "柏林"),
    ("Italy", "Rome", "意大利", "罗马"),
    ("Spain", "Madrid", "西班牙", "马德里"),
    ("Japan", "Tokyo", "日本", "东京"),
    ("China", "Beijing", "中国", "北京"),
    ("Egypt", "Cairo", "埃及", "开罗"),
    ("Canada", "Ottawa", "加拿大", "渥太华"),
    ("Australia", "Canberra", "澳大利亚", "堪培拉"),
    ("Brazil", "Brasília", "巴西", "巴西利亚"),
    ("Russia", "Moscow", "俄罗斯", "莫斯科"),
    ("India", "New Delhi", "印度", "新德里"),
    ("Kenya", "Nairobi", "肯尼亚", "内罗毕"),
    ("Mexico", "Mexico City", "墨西哥", "墨西哥城"),
    ("Norway", "Oslo", "挪威", "奥斯陆"),
    ("Sweden", "Stockholm", "瑞典", "斯德哥尔摩"),
    ("Greece", "Athens", "希腊", "雅典"),
    ("Portugal", "Lisbon", "葡萄牙", "里斯本"),
    ("Thailand", "Bangkok", "泰国", "曼谷"),
    ("South Korea", "Seoul", "韩国", "首尔"),
    ("Argentina", "Buenos Aires", "阿根廷", "布宜诺斯艾利斯"),
    ("Peru", "Lima", "秘鲁", "利马"),
    ("Turkey", "Ankara", "土耳其", "安卡拉"),
    ("Poland", "Warsaw", "波兰", "华沙"),
    ("Vietnam", "Hanoi", "越南", "河内"),
]
# English, 中文
WORDS = [
    ("apple", "苹果"),
    ("water", "水"),
    ("book", "书"),
    ("friend", "朋友"),
    ("school", "学校"),
    ("teacher", "老师"),
    ("moon", "月亮"),
    ("sun", "太阳"),
    ("mountain", "山"),
    ("river", "河"),
    ("computer", "电脑"),
    ("cat", "猫"),
    ("dog", "狗"),
    ("rain", "雨"),
    ("flower", "花"),
    ("tea", "茶"),
    ("city", "城市"),
    ("music", "音乐"),
    ("family", "家庭"),
    ("morning", "早上"),
    ("library", "图书馆"),
    ("hospital", "医院"),
    ("bread", "面包"),
    ("window", "窗户"),
    ("student", "学生"),
]
# word, opposite, 词, 反义词
ANTONYMS = [
    ("hot", "cold", "热", "冷"),
    ("big", "small", "大", "小"),
    ("fast", "slow", "快", "慢"),
    ("happy", "sad", "高兴", "难过"),
    ("open", "closed", "开", "关"),
    ("early", "late", "早", "晚"),
    ("light", "dark", "明亮", "黑暗"),
    ("old", "new", "旧", "新"),
    ("long", "short", "长", "短"),
    ("rich", "poor", "富", "穷"),
    ("high", "low", "高", "低"),
    ("strong", "weak", "强", "弱"),
    ("full", "empty", "满", "空"),
    ("easy", "difficult", "容易", "困难"),
    ("up", "down", "上", "下"),
]
UNITS = [  # (amount, from, to, factor, 中文 from, 中文 to)
    (3, "kilometres", "metres", 1000, "公里", "米"),
    (5, "kilograms", "grams", 1000, "公斤", "克"),
    (2, "hours", "minutes", 60, "小时", "分钟"),
    (4, "minutes", "seconds", 60, "分钟", "秒"),
    (7, "metres", "centimetres", 100, "米", "厘米"),
    (6, "litres", "millilitres", 1000, "升", "毫升"),
    (3, "days", "hours", 24, "天", "小时"),
    (2, "weeks", "days", 7, "周", "天"),
    (9, "kilometres", "metres", 1000, "公里", "米"),
    (8, "hours", "minutes", 60, "小时", "分钟"),
    (12, "metres", "centimetres", 100, "米", "厘米"),
    (5, "days", "hours", 24, "天", "小时"),
]
SYSTEM = "You are a concise assistant. Give the answer first, then one short reason."


def _arith(rng: random.Random) -> tuple[str, str, str, str]:
    a, b = rng.randint(12, 99), rng.randint(3, 49)
    op = rng.choice(["+", "-", "*"])
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    word = {"+": "plus", "-": "minus", "*": "times"}[op]
    zh = {"+": "加", "-": "减", "*": "乘以"}[op]
    return (
        f"What is {a} {word} {b}?",
        f"{value}. Because {a} {op} {b} = {value}.",
        f"{a}{zh}{b}等于多少？",
        f"{value}。因为 {a} {op} {b} = {value}。",
    )


def _pairs(rng: random.Random) -> list[tuple[str, str, str]]:
    """(language, question, answer) triples over every table."""
    out = []
    for country, capital, guo, du in CAPITALS:
        out.append(("en", f"What is the capital of {country}?", f"{capital}. It is the capital city of {country}."))
        out.append(("zh", f"{guo}的首都是哪里？", f"{du}。{du}是{guo}的首都。"))
    for en, zh in WORDS:
        out.append(("en", f"Translate '{en}' into Chinese.", f"{zh}. '{en}' in Chinese is {zh}."))
        out.append(("zh", f"“{zh}”用英语怎么说？", f"{en}。“{zh}”的英语是 {en}。"))
    for word, opposite, ci, fan in ANTONYMS:
        out.append(
            ("en", f"What is the opposite of '{word}'?", f"{opposite}. '{opposite}' is the antonym of '{word}'.")
        )
        out.append(("zh", f"“{ci}”的反义词是什么？", f"{fan}。“{fan}”是“{ci}”的反义词。"))
    for amount, unit_from, unit_to, factor, zh_from, zh_to in UNITS:
        value = amount * factor
        out.append(
            (
                "en",
                f"How many {unit_to} are in {amount} {unit_from}?",
                f"{value} {unit_to}. One {unit_from.rstrip('s')} is {factor} {unit_to}, "
                f"and {amount} x {factor} = {value}.",
            )
        )
        out.append(
            (
                "zh",
                f"{amount}{zh_from}等于多少{zh_to}？",
                f"{value}{zh_to}。1{zh_from}是{factor}{zh_to}，{amount} × {factor} = {value}。",
            )
        )
    for _ in range(60):
        q_en, a_en, q_zh, a_zh = _arith(rng)
        out.append(("en", q_en, a_en))
        out.append(("zh", q_zh, a_zh))
    return out


def _as_row(i: int, question: str, answer: str) -> dict:
    """Rotate the three formats so every reader is exercised."""
    kind = i % 3
    if kind == 0:
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    if kind == 1:
        return {"instruction": question, "input": "", "output": answer}
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def build() -> list[dict]:
    rng = random.Random(20261123)
    pairs = _pairs(rng)
    rng.shuffle(pairs)
    rows = [_as_row(i, q, a) for i, (_, q, a) in enumerate(pairs)]
    for i in range(0, 40, 2):  # multi-turn: two questions in one conversation, with a system prompt
        (_, q1, a1), (_, q2, a2) = pairs[i], pairs[i + 1]
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": q1},
                    {"role": "assistant", "content": a1},
                    {"role": "user", "content": q2},
                    {"role": "assistant", "content": a2},
                ]
            }
        )
    return rows


def main() -> None:
    out = Path(__file__).with_name("instructions.jsonl")
    rows = build()
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} rows -> {out}")


if __name__ == "__main__":
    main()

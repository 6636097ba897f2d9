"""Answer a question from retrieved chunks, citing them as [1], [2], ... with their source spans."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmstack.apps.llm import ChatModel
from lmstack.apps.rag.retrieve import Hit, Retriever
from lmstack.engine import SamplingParams

SYSTEM = (
    "Answer the question using only the numbered sources. Cite the sources you use as [1], [2]. "
    "If the sources do not contain the answer, say that you do not know. Answer in the question's language."
)
CITATION = re.compile(r"\[(\d+)\]")


@dataclass
class Answer:
    question: str
    text: str
    sources: list[Hit]  # the chunks shown to the model, numbered from 1
    cited: list[int]  # source numbers the answer cites

    def render(self) -> str:
        lines = [self.text.strip(), "", "Sources:"]
        for n, hit in enumerate(self.sources, 1):
            mark = "*" if n in self.cited else " "
            lines.append(f"{mark}[{n}] {hit.chunk.citation()}")
        return "\n".join(lines)


def build_messages(question: str, hits: list[Hit]) -> list[dict[str, str]]:
    sources = "\n\n".join(f"[{n}] ({h.chunk.citation()})\n{h.chunk.embed_text}" for n, h in enumerate(hits, 1))
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Sources:\n{sources}\n\nQuestion: {question}"},
    ]


def fit_sources(chat: ChatModel, question: str, hits: list[Hit], max_new_tokens: int) -> tuple[list[Hit], list[int]]:
    """The most relevant sources that fit the context with the question and the reply, and the prompt ids."""
    for n in range(len(hits), 0, -1):
        ids = chat.try_prompt_ids(build_messages(question, hits[:n]), max_new_tokens)
        if ids is not None:
            return hits[:n], ids
    return [], chat.prompt_ids(build_messages(question, []), max_new_tokens)  # too long even alone: the error


def cited_numbers(text: str, n_sources: int) -> list[int]:
    return sorted({int(m) for m in CITATION.findall(text) if 1 <= int(m) <= n_sources})


def answer_questions(
    chat: ChatModel, retriever: Retriever, questions: list[str], k: int, params: SamplingParams
) -> list[Answer]:
    """Retrieve for every question, then generate all answers in one batched engine call."""
    prepared = [fit_sources(chat, q, retriever.search(q, k), params.max_new_tokens) for q in questions]
    texts = chat.complete([ids for _, ids in prepared], params)
    return [
        Answer(q, text, hits, cited_numbers(text, len(hits)))
        for q, (hits, _), text in zip(questions, prepared, texts, strict=True)
    ]

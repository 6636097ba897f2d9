"""`lmstack agent`: run one task (trace on stderr, answer on stdout) or score a task set with and without tools."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from lmstack.errors import LmstackError, require


def load_tasks(path: str | Path) -> list[dict[str, str]]:
    path = Path(path)
    require(path.is_file(), f"task file {str(path)!r} does not exist")
    tasks = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LmstackError(f"{path}:{number}: malformed JSON ({exc.msg})") from None
        require(
            isinstance(item.get("task"), str) and isinstance(item.get("answer"), str),
            f"{path}:{number}: needs string fields task and answer",
        )
        tasks.append(item)
    require(bool(tasks), f"{path} holds no tasks")
    return tasks


def succeeded(answer: str | None, expected: str) -> bool:
    """The expected answer appears in the final answer (case, spaces and thousands separators ignored)."""
    if not answer:
        return False
    squash = lambda s: "".join(s.lower().replace(",", "").split())
    return squash(expected) in squash(answer)


def agent_cli(args: argparse.Namespace) -> None:
    from lmstack.apps.agent.loop import Agent
    from lmstack.apps.agent.mcp_client import McpServerTools
    from lmstack.apps.agent.tools import build_tools
    from lmstack.apps.llm import ChatModel
    from lmstack.engine import SamplingParams

    require(bool(args.task) != bool(args.eval), "give a task, or --eval TASKS.jsonl (not both)")
    tasks = load_tasks(args.eval) if args.eval else None
    tools = build_tools(args.tools, args.tool_timeout)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    with contextlib.ExitStack() as stack:
        for command in args.mcp:
            server = McpServerTools(command, call_timeout=args.tool_timeout)
            stack.callback(server.close)
            tools += server.tools()
        chat = ChatModel.from_ref(args.model, args.device)

        def agent(with_tools: bool, verbose: bool) -> Agent:
            on_step = (lambda step: print(step, file=sys.stderr, flush=True)) if verbose else None
            return Agent(chat, tools if with_tools else [], params, args.max_steps, args.tool_timeout,
                         args.tool_choice if with_tools else "auto", on_step=on_step)  # fmt: skip

        if tasks is None:
            result = agent(True, verbose=True).run(args.task)
            print(result.answer if result.answer is not None else "(no answer: step limit reached)")
            return
        rows = []
        for with_tools in (False, True):
            runner = agent(with_tools, verbose=False)
            wins = sum(succeeded(runner.run(t["task"]).answer, t["answer"]) for t in tasks)
            rows.append((("with tools" if with_tools else "without tools"), wins))
    print("| agent | solved | success rate |\n|---|---:|---:|")
    for name, wins in rows:
        print(f"| {name} | {wins}/{len(tasks)} | {wins / len(tasks):.2f} |")

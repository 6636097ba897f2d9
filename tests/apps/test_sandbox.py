"""The agent's code-execution sandbox: a confined child process, never the host."""

from __future__ import annotations

import os
import socket
import time

import pytest

from lmstack.apps.agent.sandbox import SandboxLimits, run_python
from lmstack.apps.agent.tools import build_tools, python_tool
from lmstack.errors import LmstackError

LIMITS = SandboxLimits(timeout=3, cpu_seconds=3, memory_mb=256)


def test_code_runs_in_another_process_and_its_output_comes_back():
    result = run_python("import os\nprint(6 * 7)\nprint('西湖')\nprint(os.getpid())\nprint(dict(os.environ))", LIMITS)
    lines = result.output.splitlines()
    assert result.exit_code == 0 and lines[:2] == ["42", "西湖"]
    assert int(lines[2]) != os.getpid()
    assert "PATH" not in lines[3] and "HOME" not in lines[3]  # an empty environment (Python adds only LC_CTYPE)
    error = run_python("def f():\n    return 1 / 0\nf()", LIMITS).report(LIMITS)
    assert "ZeroDivisionError" in error and "return 1 / 0" in error and error.endswith("[exit status 1]")


def test_an_infinite_loop_is_killed_at_the_deadline():
    limits = SandboxLimits(timeout=1.5, cpu_seconds=10)
    start = time.monotonic()
    result = run_python("print('started', flush=True)\nwhile True:\n    pass", limits)
    assert time.monotonic() - start < 5
    assert result.timed_out and result.output.strip() == "started"
    assert "[killed: the code ran longer than 1.5 s]" in result.report(limits)


def test_the_cpu_limit_kills_a_busy_process():
    limits = SandboxLimits(timeout=20, cpu_seconds=1)
    result = run_python("while True:\n    pass", limits)
    assert not result.timed_out and "SIGXCPU" in result.report(limits)


def test_a_memory_bomb_fails_cleanly():
    result = run_python("x = bytearray(4 * 1024**3)\nprint('allocated')", LIMITS)
    assert result.exit_code == 1 and "MemoryError" in result.output and "allocated" not in result.output


def test_no_network_not_even_loopback():
    listener = socket.create_server(("127.0.0.1", 0))  # a real host port the code would reach without the namespace
    port = listener.getsockname()[1]
    try:
        code = (
            "import socket\n"
            "for host in ('127.0.0.1', '1.1.1.1'):\n"
            "    try:\n"
            "        socket.create_connection((host, PORT), timeout=2)\n"
            "        print(host, 'connected')\n"
            "    except OSError as exc:\n"
            "        print(host, 'refused', exc.errno)\n"
        ).replace("PORT", str(port))
        result = run_python(code, LIMITS)
    finally:
        listener.close()
    assert "connected" not in result.output
    assert "127.0.0.1 refused" in result.output and "1.1.1.1 refused" in result.output


def test_writes_stay_inside_the_scratch_directory(tmp_path):
    outside = tmp_path / "escaped.txt"
    code = (
        "import os\n"
        "open('notes.txt', 'w').write('kept')\n"
        "print(os.getcwd(), open('notes.txt').read())\n"
        f"for path in ('../escaped.txt', {str(outside)!r}):\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "        print('wrote', path)\n"
        "    except OSError as exc:\n"
        "        print('denied', type(exc).__name__)\n"
    )
    result = run_python(code, LIMITS)
    workdir, content = result.output.splitlines()[0].split()
    assert content == "kept" and result.output.count("denied PermissionError") == 2 and "wrote" not in result.output
    assert not outside.exists() and not (tmp_path.parent / "escaped.txt").exists()
    assert not os.path.exists(workdir)  # the scratch directory is gone after the call


def test_output_is_capped():
    limits = SandboxLimits(timeout=5, max_output=1000)
    result = run_python("print('x' * 100_000)", limits)
    assert result.truncated and len(result.output) == 1000
    assert result.report(limits).endswith("[output cut at 1000 bytes]")


def test_python_tool_runs_code_and_is_listed_by_its_spec_names():
    tool = python_tool(timeout=3)
    assert tool.name == "run_python" and tool.run({"code": "print(2 ** 10)"}) == "1024"
    assert [t.name for t in build_tools("code")] == ["run_python"]


def test_no_sandbox_means_no_python_tool(monkeypatch):
    import lmstack.apps.agent.sandbox as sandbox

    monkeypatch.setattr(sandbox, "sandbox_check", lambda: "unshare(CLONE_NEWUSER | CLONE_NEWNET) failed")
    with pytest.raises(LmstackError, match="python tool is not offered on this machine.*CLONE_NEWNET"):
        build_tools("calculator,python")

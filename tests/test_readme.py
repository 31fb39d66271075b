"""The README is part of the product: its Quickstart holds exactly the two commands, CI runs
the second one verbatim, and its Python examples run."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def test_quickstart_has_exactly_two_commands_and_ci_runs_the_second():
    blocks = re.findall(r"```(\w*)\n(.*?)```", _section("Quickstart"), re.S)
    assert len(blocks) == 2, blocks
    cmds = [body.strip() for _lang, body in blocks]
    assert all("\n" not in c for c in cmds), "each Quickstart block must be one command"
    assert "fastssl bench" in cmds[0] and "pytest" in cmds[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert cmds[1] in ci.splitlines(), ".ci/run must run the README's test command verbatim"


def test_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_gpu_install_section_matches_the_build_and_ci_checks_it():
    """The GPU install the README documents is the one CI builds (scripts/check_cuda_build.sh),
    and the default architectures it states are setup.py's."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/check_cuda_build.sh" in ci.splitlines()
    setup_py = (ROOT / "setup.py").read_text()
    default = re.search(r'^DEFAULT_CUDA_ARCH_LIST = "(.+)"$', setup_py, re.M)
    assert default, "setup.py has no DEFAULT_CUDA_ARCH_LIST"
    gpu = _section("Install on a GPU machine")
    assert f'TORCH_CUDA_ARCH_LIST="{default.group(1)}"' in gpu
    for needed in ("pip install --no-build-isolation .", "FASTSSL_NO_EXT=1", "fastssl info"):
        assert needed in gpu, needed

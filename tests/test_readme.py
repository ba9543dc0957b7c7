"""The README's quick start runs as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.+?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_quick_start_runs(capsys):
    block = _python_blocks()[0]
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "[" in out  # the printed losses and weights
    weights = namespace["optimizer"].opt_state[0].weights
    assert weights.shape == (3,) and abs(float(weights.sum()) - 1.0) < 1e-5


@pytest.mark.parametrize("marker", ["demo", "test"])
def test_readme_has_the_two_setup_commands(marker):
    text = README.read_text(encoding="utf-8")
    assert re.search(rf"<!-- {marker}-command -->\s*```bash\n.+?\n```", text, re.S)

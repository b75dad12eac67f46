"""Every guide's code runs: the ```python blocks of each docs/guides/*.md page and of
the README (its first example, which the first guide includes), in order, as one
script in a fresh directory (blocks written as
```{code-block} python are shown, not run: each says why).  The guides' own
asserts check their numbers against direct computations."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the guides, and the README (its first example; docs/guides/first-lca.md includes it)
GUIDES = sorted((ROOT / "docs" / "guides").glob("*.md")) + [ROOT / "README.md"]
# what a guide's code imports beyond the minimal install
NEEDS = {"reading-a-run.md": ["matplotlib"], "trainer.md": ["transformers"],
         "lightning.md": ["lightning"]}
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def code_of(page: Path) -> str:
    return "\n".join(_BLOCK.findall(page.read_text()))


def test_guides_found():
    runnable = [p.name for p in GUIDES if code_of(p)]
    assert len(runnable) >= 8, runnable


@pytest.mark.parametrize("page", [p for p in GUIDES if code_of(p)], ids=lambda p: p.stem)
def test_guide_code_runs(page, tmp_path):
    for module in NEEDS.get(page.name, []):
        pytest.importorskip(module, reason=f"{page.name} needs {module} (an extra)")
    script = tmp_path / f"guide_{page.stem.replace('-', '_')}.py"   # never a package's name
    script.write_text(code_of(page))
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{page.name}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

"""The README's snippets run as written: every ```python block of README.md, each in a fresh interpreter, in a
folder prepared with what the blocks name (a `runs/demo` run folder holding a random-init tiny VAE, `photos/`, a
`latents/` cache of those photos), offline and on the CPU. The test id is the line of the block's opening fence.

Only the changes listed in SUBSTITUTIONS (network or GPU -> this machine) and the variables listed in CONTEXT
(what the prose leaves to the reader) are applied; anything else a block needs must be in README.md."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sdvae.cache import build_cache
from sdvae.models import build_vae

from .conftest import write_photos

pytestmark = pytest.mark.slow  # one interpreter (torch import) per block, and a cache build

README = Path(__file__).resolve().parents[1] / "README.md"

TIMEOUT_S = 300


def python_blocks(text: str) -> dict[int, str]:
    """{line of the opening ```python fence (1-based): the block's code, dedented}."""
    blocks, lines, i = {}, text.splitlines(), 0
    while i < len(lines):
        match = re.match(r"^(\s*)```python\s*$", lines[i])
        if not match:
            i += 1
            continue
        start, body, i = i + 1, [], i + 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"README.md:{start}: ```python block is never closed")
        blocks[start] = textwrap.dedent("\n".join(body)) + "\n"
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def block_with(marker: str) -> int:
    """The line of the one block holding `marker`: tables keyed by content, not by a line that edits above move."""
    lines = [line for line, code in BLOCKS.items() if marker in code]
    assert len(lines) == 1, f"{len(lines)} README ```python blocks hold {marker!r}"
    return lines[0]


CODEC = 'codec = sdvae.load_vae("runs/demo"'

# block -> [(README text, what runs instead, why)]; each README text must occur in its block, so
# a stale entry fails instead of silently doing nothing.
SUBSTITUTIONS = {
    block_with(CODEC): ([('device="cuda"', 'device="cpu"', "tests run on CPU-only machines"),
           ("torch.float16", "torch.float32", "fp16 on a CPU without AVX512 is slow and warns; fp32 is the CPU path")]
          if not torch.cuda.is_available() else []),
}

# block -> code run before the block: placeholders the README's prose defines, not the block.
CONTEXT = {
    # "PIL images, uint8 arrays or a (B,3,H,W) tensor ..., one size" and the size to decode to.
    block_with(CODEC): 'from PIL import Image\n'
         'images = [Image.open(f"photos/{n}.png").convert("RGB").resize((64, 48)) for n in ("astronaut", "coffee")]\n'
         'w, h = images[0].size\n',
}

# block -> (the error it fails with now, the README.md change that fixes it). Such a block is
# xfailed only while it fails with exactly that error; once README.md is fixed the test fails until the entry goes.
KNOWN_BROKEN = {}



def runnable(line: int, code: str) -> str:
    for old, new, _why in SUBSTITUTIONS.get(line, []):
        assert old in code, f"README.md:{line}: substitution {old!r} no longer matches the block; update SUBSTITUTIONS"
        code = code.replace(old, new)
    return CONTEXT.get(line, "") + code


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """What the blocks name, relative to their cwd."""
    root = tmp_path_factory.mktemp("readme")
    torch.manual_seed(0)
    build_vae("tiny").save_pretrained(root / "runs" / "demo" / "vae")  # an sdvae run folder: the export in vae/
    write_photos(root / "photos", size=48)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_cache(str(root / "runs" / "demo"), str(root / "photos"), root / "latents", resolution=64,
                    batch_size=4, num_workers=0, progress=False)
    finally:
        torch.set_num_threads(threads)
    return root


def test_readme_has_python_blocks():
    assert BLOCKS, "no ```python block found in README.md"
    for table in (SUBSTITUTIONS, CONTEXT, KNOWN_BROKEN):
        assert set(table) <= set(BLOCKS), f"entries for lines that are no ```python block: {set(table) - set(BLOCKS)}"


@pytest.mark.slow
@pytest.mark.parametrize("line", [pytest.param(line, id=f"line{line}") for line in BLOCKS])
def test_readme_block_runs(line, workdir):
    script = workdir / f"readme_block_{line}.py"
    script.write_text(runnable(line, BLOCKS[line]), encoding="utf-8")
    env = dict(os.environ, SDVAE_BACKEND="pytorch", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    try:
        result = subprocess.run([sys.executable, script.name], cwd=workdir, env=env, capture_output=True, text=True,
                                timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"README.md block at line {line} ran past {TIMEOUT_S} s\n--- stderr tail ---\n"
                    f"{(e.stderr or b'')[-3000:]}")
    if line in KNOWN_BROKEN:
        error, fix = KNOWN_BROKEN[line]
        if result.returncode == 0:
            pytest.fail(f"README.md block at line {line} runs now: remove it from KNOWN_BROKEN", pytrace=False)
        if error in result.stderr:
            pytest.xfail(f"README.md:{line} cannot run as written ({error}); README fix: {fix}")
    if result.returncode != 0:
        pytest.fail(f"README.md block at line {line} failed (exit {result.returncode})\n--- code run ---\n"
                    f"{script.read_text()}--- stderr tail ---\n{result.stderr[-3000:]}", pytrace=False)

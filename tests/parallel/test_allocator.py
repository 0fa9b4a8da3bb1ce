"""The allocator switch: a command re-executes itself once under tcmalloc, keeping its argv."""

import os
import subprocess
import sys

from mmssl_jax.parallel import allocator

SCRIPT = (
    "import sys; from mmssl_jax.parallel import allocator; allocator.use_tcmalloc(); "
    "print(allocator.loaded(), sys.argv[1:])"
)


def _run(**env) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LD_PRELOAD", allocator.ENV))}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, "a", "--b=1"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_find_tcmalloc_takes_the_first_directory_that_has_it(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    assert allocator.find_tcmalloc([str(first), str(second)]) is None
    (second / "libtcmalloc.so.4").touch()
    (first / "libtcmalloc_minimal.so.4").touch()
    assert allocator.find_tcmalloc([str(first), str(second)]) == str(
        first / "libtcmalloc_minimal.so.4"
    )


def test_reexecutes_under_tcmalloc_once_with_the_same_arguments():
    expected = "tcmalloc" if allocator.find_tcmalloc() else "system"
    assert _run() == f"{expected} ['a', '--b=1']"
    # Opted out: the C library's allocator, no re-execution.
    assert _run(**{allocator.ENV: "system"}) == "system ['a', '--b=1']"
    # A re-executed process that still lacks it (a broken library) does not loop.
    assert _run(**{f"{allocator.ENV}_REEXEC": "1"}) == "system ['a', '--b=1']"


def test_the_printed_path_honours_the_opt_out():
    def printed(**env):
        clean = {k: v for k, v in os.environ.items() if not k.startswith(allocator.ENV)}
        return subprocess.run(
            [sys.executable, "-m", "mmssl_jax.parallel.allocator"],
            env={**clean, **env},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    assert printed() == (allocator.find_tcmalloc() or "")
    assert printed(**{allocator.ENV: "system"}) == ""

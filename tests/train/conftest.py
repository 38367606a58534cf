"""Session fixtures of the CLI tests: the subprocess environment and one uninterrupted ring-jax-sft run, made once
per pytest run even under pytest-xdist (whose workers are separate processes, each with its own session): the first
worker to need them builds them in the run's shared temporary directory under a file lock, the others reuse them.
The JAX compilation cache lives there too, so a program one run compiled is loaded by every later run with the same
shapes, in any worker."""

import fcntl

import pytest

from tests.train.cli_run import BASE, cli_env, finish, sft


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory, request):
    """A directory every xdist worker of this pytest run sees (the run's base temp; without xdist, this session's)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if hasattr(request.config, "workerinput") else base


@pytest.fixture(scope="session")
def env(shared_dir):
    cache = shared_dir / "jax_cache"
    cache.mkdir(exist_ok=True)
    return cli_env(str(cache))


@pytest.fixture(scope="session")
def uninterrupted(env, shared_dir):
    """A finished 8-step run with checkpoints at steps 2, 4, 6, 8; tests must not change it (copy it first)."""
    run, done = shared_dir / "run_a", shared_dir / "run_a.done"
    with open(shared_dir / "run_a.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            if run.exists():  # a worker that failed to make it
                import shutil

                shutil.rmtree(run)
            rc, out, err = finish(sft(BASE + [f"--out_dir={run}"], env))
            assert rc == 0, err[-3000:]
            assert "done: step 8" in out
            done.touch()
    return str(run)

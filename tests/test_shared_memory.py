"""Whether dora's shared-memory transport can work for this user: the memory-locking allowance
read from the process, and what `omni doctor` says of it."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from mofa_omni.node.shared_memory import (
    CAP_IPC_LOCK,
    LockLimit,
    effective_capabilities,
    lock_limit,
    shared_memory_verdict,
)

MIB = 1 << 20


def test_the_capability_mask_is_read_from_the_status_text():
    status = "Name:\tpython\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n"
    assert effective_capabilities(status) >> CAP_IPC_LOCK & 1
    assert effective_capabilities("CapEff:\t0000000000000000\n") == 0
    assert effective_capabilities("Name:\tpython\n") == 0


@pytest.mark.parametrize(("allowance", "works", "words"), [
    (LockLimit(8 * MIB, capable=True), True, "on (CAP_IPC_LOCK)"),
    (LockLimit(None, capable=False), True, "no limit"),
    (LockLimit(8 * MIB, capable=False), False, "off: this user may lock 8 MiB"),
    (LockLimit(64 * MIB, capable=False), True, "partly: this user may lock 64 MiB"),
    (LockLimit(1024 * MIB, capable=False), True, "on: this user may lock 1024 MiB"),
])
def test_the_verdict_follows_the_allowance(allowance, works, words):
    ok, line = shared_memory_verdict(allowance)
    assert ok == works and words in line
    if "off" in line or "partly" in line:
        assert "ulimit -l" in line and "512 MiB" in line


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux limits")
def test_this_process_s_allowance_is_its_own():
    allowance = lock_limit()
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    assert allowance.limit == (None if soft == resource.RLIM_INFINITY else soft)
    with open("/proc/self/status") as f:
        assert allowance.capable == bool(effective_capabilities(f.read()) >> CAP_IPC_LOCK & 1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux limits")
def test_a_process_without_the_capability_is_judged_by_its_limit():
    """A child that gave up CAP_IPC_LOCK (setpriv) and may lock 4 MiB is told shared memory is
    off."""
    code = ("from mofa_omni.node.shared_memory import lock_limit, shared_memory_verdict; "
            "print(shared_memory_verdict(lock_limit())[1])")
    setpriv = ["setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock"]
    if subprocess.run(["sh", "-c", "command -v setpriv"], capture_output=True).returncode:
        pytest.skip("setpriv is not installed")
    done = subprocess.run(["prlimit", f"--memlock={4 * MIB}:{4 * MIB}", *setpriv,
                           sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("off: this user may lock 4 MiB"), done.stdout

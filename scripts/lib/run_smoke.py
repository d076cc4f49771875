#!/usr/bin/env python3
"""Checks the README's run command the way a person uses it.

`scripts/run.sh` runs in a pseudo-terminal with a fresh data dir; once it says it is ready, the
two commands it printed (the `veil` CLI and `curl`) are run exactly as printed and must answer
with generated text; then Ctrl-C must stop the router and the miner. A second start on the same
data dir must come up again (no new admin key, the same miner) and answer again.

Usage: run_smoke.py REPO_ROOT    (standard library only)
"""

import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

READY = "Ctrl-C stops both."
FIRST_START = "First start: admin API key"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def fail(msg, output=""):
    if output:
        sys.stderr.write(output[-4000:] + "\n")
    sys.stderr.write(f"run smoke test: {msg}\n")
    sys.exit(1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """scripts/run.sh in a pseudo-terminal, as on a person's terminal."""

    def __init__(self, root, data, listen):
        self.out = ""
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.chdir(root)
            os.execvp("scripts/run.sh", ["scripts/run.sh", "--listen", listen, "--data-dir", data])

    def read(self, timeout):
        """Reads what is there within `timeout` seconds; False at the end of the output."""
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return True
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: the process and its terminal are gone
            return False
        if not chunk:
            return False
        self.out += ANSI.sub("", chunk.decode("utf-8", "replace")).replace("\r\n", "\n")
        return True

    def wait_for(self, needle, seconds):
        deadline = time.monotonic() + seconds
        while needle not in self.out:
            if time.monotonic() > deadline:
                fail(f"no {needle!r} within {seconds} s", self.out)
            if not self.read(1.0):
                fail(f"run.sh ended before {needle!r}", self.out)

    def ctrl_c(self, seconds=90):
        """Presses Ctrl-C on the terminal and waits for the script to end."""
        os.write(self.fd, b"\x03")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.read(0.5)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                while self.read(0.2):
                    pass
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        fail(f"Ctrl-C did not stop run.sh within {seconds} s", self.out)


def printed_commands(out):
    """The indented command blocks printed after the ready banner, continuation lines joined."""
    text = out[out.rindex("Veil is running") :]
    blocks, current = [], []
    for line in text.split("\n"):
        if line.startswith("  ") and line.strip():
            current.append(line.strip())
        elif current:
            blocks.append(" ".join(current).replace("\\ ", " "))
            current = []
    return blocks


def check_commands(root, out):
    blocks = printed_commands(out)
    veil = [b for b in blocks if " complete " in b]
    curl = [b for b in blocks if b.startswith("curl ")]
    if len(veil) != 1 or len(curl) != 1:
        fail(f"expected one veil and one curl command, got {blocks}", out)
    miner = re.search(r"--allow-miner (0x[0-9a-fA-F]{40})", veil[0])
    if not miner:
        fail("the veil command names no miner to allow", out)

    r = subprocess.run(["bash", "-c", veil[0]], cwd=root, capture_output=True, text=True, timeout=300)
    if r.returncode != 0 or not r.stdout.strip():
        fail(f"the printed veil command failed ({r.returncode}): {r.stderr}", out)
    r = subprocess.run(["bash", "-c", curl[0]], cwd=root, capture_output=True, text=True, timeout=300)
    try:
        body = json.loads(r.stdout)
        text = body["choices"][0]["message"]["content"]
        tokens = body["usage"]["completion_tokens"]
    except (ValueError, KeyError, IndexError, TypeError):
        fail(f"the printed curl command gave no completion: {r.stdout} {r.stderr}", out)
    if not text or tokens != 32:
        fail(f"unexpected completion: {body}", out)
    return miner.group(1)


def process_alive(marker):
    """Whether a process whose command line contains `marker` is still running."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:  # gone meanwhile
            continue
        if marker in cmdline:
            return True
    return False


def start_and_check(root, data, first):
    listen = f"127.0.0.1:{free_port()}"
    run = Run(root, data, listen)
    # The first start may build the binaries.
    run.wait_for(READY, 1800 if first else 300)
    if (FIRST_START in run.out) != first:
        fail("the admin API key must be shown on the first start only", run.out)
    miner = check_commands(root, run.out)
    status = run.ctrl_c()
    if status != 130:
        fail(f"run.sh exited with {status} after Ctrl-C, not 130", run.out)
    for marker in (f"--data-dir {data}/local/miner", f"--listen {listen}"):
        if process_alive(marker):
            fail(f"a process ({marker}) outlived Ctrl-C", run.out)
    return miner


def main():
    if len(sys.argv) != 2:
        fail("usage: run_smoke.py REPO_ROOT")
    root = os.path.abspath(sys.argv[1])
    data = tempfile.mkdtemp(prefix="veil-run-smoke-")
    try:
        t = time.monotonic()
        first = start_and_check(root, data, True)
        t1 = time.monotonic() - t
        t = time.monotonic()
        second = start_and_check(root, data, False)
        t2 = time.monotonic() - t
        if first != second:
            fail(f"the second start serves another miner ({second}, not {first})")
        print(f"run.sh: first start {t1:.0f} s, second start {t2:.0f} s, miner {first}: "
              "veil and curl completions, Ctrl-C stops both")
    finally:
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()

"""`torchrun --nproc-per-node 2 -m glm4 ...`: every rank computes, rank 0 alone talks (gloo, CPU)."""

import os
import signal
import subprocess
import sys
import time

import httpx
from helpers import free_port

# --standalone: torchrun binds its own free rendezvous port, so no port is picked here and raced for.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_generate_under_torchrun():
    cmd = [
        *TORCHRUN,
        "-m",
        "glm4",
        "generate",
        "What is the capital of France?",
        "--device",
        "cpu",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("The capital of France is Paris.") == 1  # rank 0 only


def test_serve_under_torchrun():
    port = free_port()
    cmd = [*TORCHRUN, "-m", "glm4", "serve", "--port", str(port), "--device", "cpu"]
    server = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env(), start_new_session=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.5)
        body = {"model": "glm4-demo", "messages": [{"role": "user", "content": "What is 4 + 5?"}]}
        for _ in range(2):
            reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
            assert reply["choices"][0]["message"]["content"] == "4 + 5 = 9."
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)

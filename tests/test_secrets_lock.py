"""sana_core.secrets (redaction of configs and URLs) and sana_core.lock (exclusive output-folder lock)."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from sana_core.errors import SanaError
from sana_core.lock import LOCK_NAME, OutputLock, _pid_ns, _proc_start, _read_text
from sana_core.secrets import REDACTED, is_secret_key, redact, redact_argv, redact_text, strip_url_credentials

HF = "hf_" + "a1B2c3D4e5F6g7H8i9J0kLmN"


# --- secrets ---------------------------------------------------------------------------------------------------

def test_redact_hides_secret_keys_and_env_values_and_keeps_the_rest():
    cfg = {"vlms": {"qwen": {"name": "qwen", "max_tokens": 64, "tokenizer": "tok/path",
                             "env": {"HF_TOKEN": "abc", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "EMPTY": ""}}},
           "hf_token": "xyz", "apiKey": "k1", "db-password": "p", "aws_secret_access_key": "s", "api_key": "a",
           "auth": {"user": "u", "pass": "v"}, "caption_key": "c", "nan_keys": ["k"], "unset_token": None,
           "lr": 1e-4, "list": [{"client_secret": "q"}, "plain"], "path": "/data/x"}
    before = json.dumps(cfg, sort_keys=True)
    out = redact(cfg)
    assert json.dumps(cfg, sort_keys=True) == before  # the input is never modified
    env = out["vlms"]["qwen"]["env"]
    assert env == {"HF_TOKEN": REDACTED, "VLLM_CPU_OMP_THREADS_BIND": REDACTED, "EMPTY": ""}
    assert out["vlms"]["qwen"]["max_tokens"] == 64 and out["vlms"]["qwen"]["tokenizer"] == "tok/path"
    for k in ("hf_token", "apiKey", "db-password", "aws_secret_access_key", "api_key"):
        assert out[k] == REDACTED, k
    assert out["auth"] == {"user": REDACTED, "pass": REDACTED}
    assert out["caption_key"] == "c" and out["nan_keys"] == ["k"] and out["unset_token"] is None
    assert out["lr"] == 1e-4 and out["list"] == [{"client_secret": REDACTED}, "plain"] and out["path"] == "/data/x"


def test_redact_hides_token_shaped_values_and_url_credentials_anywhere():
    cfg = {"note": f"use {HF} here", "model": "https://bob:hunter2@example.com/m?X-Amz-Signature=abc&v=1",
           "items": ("s3://b/k", f"Bearer {HF}")}
    out = redact(cfg)
    assert HF not in json.dumps(out) and "hunter2" not in json.dumps(out) and "abc" not in out["model"]
    assert out["model"] == "https://example.com/m?v=1"
    assert out["items"] == ("s3://b/k", f"Bearer {REDACTED}")


def test_redact_takes_dataclasses():
    from training.config import TrainConfig

    out = redact(TrainConfig())
    assert out["optim"]["lr"] == TrainConfig().optim.lr and out["model"]["max_length"] == 300


@pytest.mark.parametrize("url,want", [
    ("https://user:pw@host.example/a/b.jpg", "https://host.example/a/b.jpg"),
    ("https://host/a.jpg?X-Amz-Algorithm=AWS4&X-Amz-Credential=AK%2F1&X-Amz-Signature=deadbeef&x=1",
     "https://host/a.jpg?x=1"),
    ("https://acct.blob.core.windows.net/c/a.png?sv=2022&sig=abc%3D&w=3", "https://acct.blob.core.windows.net/c/a.png?sv=2022&w=3"),
    ("https://storage.googleapis.com/b/o?X-Goog-Signature=ff&X-Goog-Date=1", "https://storage.googleapis.com/b/o"),
    ("https://cdn/x.jpg?token=t0k&Signature=s&Policy=p&Key-Pair-Id=k", "https://cdn/x.jpg"),
    ("http://h:8080/p?a=1&b=2#frag", "http://h:8080/p?a=1&b=2#frag"),  # nothing secret: unchanged, byte for byte
    ("/local/path/a.jpg", "/local/path/a.jpg"),
    ("s3://bucket/key.tar", "s3://bucket/key.tar"),
    ("ftp://anon@h/f", "ftp://h/f"),
])
def test_strip_url_credentials(url, want):
    assert strip_url_credentials(url) == want


def test_redact_text_in_a_log_line():
    line = f"failed to read https://u:p@h/x.jpg?sig=1 with token {HF}"
    assert redact_text(line) == f"failed to read https://h/x.jpg with token {REDACTED}"


def test_redact_argv_for_recorded_command_lines():
    argv = ["-m", "jobs.train", "--set", "model.autoencoder=https://u:pw@h/x?sig=1", "--set",
            "vlms.q.env.SOME_VAR=abc", "--set", "hf_token=zz", "--api-key", "K", "--set", "optim.lr=1e-4", HF]
    assert redact_argv(argv) == ["-m", "jobs.train", "--set", "model.autoencoder=https://h/x", "--set",
                                 f"vlms.q.env.SOME_VAR={REDACTED}", "--set", f"hf_token={REDACTED}", "--api-key",
                                 REDACTED, "--set", "optim.lr=1e-4", REDACTED]


def test_is_secret_key_whole_parts_only():
    assert is_secret_key("HF_TOKEN") and is_secret_key("accessKey") and is_secret_key("private-key")
    assert not any(is_secret_key(k) for k in ("max_tokens", "tokenizer", "key", "keys", "monkey", "author"))


# --- lock ------------------------------------------------------------------------------------------------------

def _holder_process(folder):
    """A real second process that takes the lock and waits; returns once it holds it."""
    code = ("import sys, time; from sana_core.lock import OutputLock; "
            "l = OutputLock(sys.argv[1], what='test job').acquire(); print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_holder_refused_with_host_and_pid_then_stale_lock_taken_over(tmp_path):
    p = _holder_process(tmp_path)
    try:
        with pytest.raises(SanaError) as e:
            OutputLock(tmp_path, what="training run").acquire()
        msg = str(e.value)
        assert "\n" not in msg and f"host {socket.gethostname()} pid {p.pid}" in msg and "test job" in msg
        assert str(tmp_path / LOCK_NAME) in msg
    finally:
        p.kill()
        p.wait()
    # The holder died without releasing (SIGKILL): same host, pid gone, so the lock is stale and taken over.
    lock = OutputLock(tmp_path, what="training run").acquire()
    assert lock.took_over is not None and lock.took_over["pid"] == p.pid
    assert lock.read_holder()["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def _plant(folder, **fields):
    rec = {"host": socket.gethostname(), "pid": os.getpid(), "pid_ns": _pid_ns(),
           "boot_id": _read_text("/proc/sys/kernel/random/boot_id"), "start": _proc_start(os.getpid()),
           "since": "then", "what": "old job", "token": "t"}
    rec.update(fields)
    (folder / LOCK_NAME).write_text(json.dumps(rec))


def test_lock_of_another_host_is_never_taken_over(tmp_path):
    _plant(tmp_path, host="node-17", pid=1)
    with pytest.raises(SanaError, match="host node-17 pid 1 "):
        OutputLock(tmp_path).acquire()


def test_reused_pid_and_reboot_count_as_stale(tmp_path):
    # A live pid (our parent) whose start time is not the recorded one: the pid now belongs to another process.
    _plant(tmp_path, pid=os.getppid(), start="1")
    assert OutputLock(tmp_path).acquire().took_over["pid"] == os.getppid()
    os.remove(tmp_path / LOCK_NAME)
    _plant(tmp_path, pid=os.getppid(), start=_proc_start(os.getppid()), boot_id="another-boot")
    assert OutputLock(tmp_path).acquire().took_over["boot_id"] == "another-boot"
    os.remove(tmp_path / LOCK_NAME)
    _plant(tmp_path, pid=os.getppid(), start=_proc_start(os.getppid()))  # alive and the same process: held
    with pytest.raises(SanaError, match=f"pid {os.getppid()} "):
        OutputLock(tmp_path).acquire()


def test_dead_pid_in_another_pid_namespace_is_not_judged(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    _plant(tmp_path, pid=dead, pid_ns="pid:[1]")
    with pytest.raises(SanaError, match=f"pid {dead} "):
        OutputLock(tmp_path).acquire()
    _plant(tmp_path, pid=dead)
    assert OutputLock(tmp_path).acquire().took_over["pid"] == dead


def test_garbled_lock_file_refused_while_fresh_and_taken_over_when_old(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text("{not json")
    with pytest.raises(SanaError, match="being written or damaged"):
        OutputLock(tmp_path).acquire()
    old = time.time() - 3600
    os.utime(path, (old, old))
    lock = OutputLock(tmp_path).acquire()
    assert lock.held and lock.read_holder()["token"] == lock.token


def test_release_leaves_a_lock_it_does_not_own_and_context_manager(tmp_path):
    with OutputLock(tmp_path) as lock:
        assert lock.held
        _plant(tmp_path, token="someone-else")  # replaced behind our back (e.g. deleted by hand, retaken)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == "someone-else"
    os.remove(tmp_path / LOCK_NAME)
    with OutputLock(tmp_path / "new" / "dir") as lock:  # creates the folder
        assert (tmp_path / "new" / "dir" / LOCK_NAME).exists()
    assert not (tmp_path / "new" / "dir" / LOCK_NAME).exists()


def test_lock_file_records_a_redacted_command_line(tmp_path, monkeypatch):
    secret = "plain-secret-value"  # no known token shape: only the key says it is secret
    monkeypatch.setattr(sys, "argv", ["jobs.curate", "--set", f"vlms.llava.env.PROXY_VAR={secret}"])
    with OutputLock(tmp_path, what="test"):
        text = (tmp_path / LOCK_NAME).read_text()
    assert secret not in text and f"vlms.llava.env.PROXY_VAR={REDACTED}" in text

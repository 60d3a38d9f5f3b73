"""The benchmark suite (scripts/bench.py, the package scripts/benchmark): its --quick run is
exact against every target kind, it fails loudly when counts are off, and its frame counter is
exact on split and coalesced frames."""
import json
import os
import socket
import subprocess
import sys
import time

from conftest import APP_ID, KEY, ROOT, SECRET

from benchmark.loadgen import HANDSHAKE, Loop, Ws

from bunpulse.frames import build_frame

BENCH = os.path.join(ROOT, "scripts", "bench.py")


def run_bench(*args, timeout=120):
    proc = subprocess.run([sys.executable, BENCH, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, results


def by_scenario(results):
    return {r["scenario"]: r for r in results}


def test_quick_run_on_the_local_target_is_exact():
    proc, results = run_bench("--quick")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = by_scenario(results)
    assert set(found) == {"fanout", "latency", "connections", "http", "presence"}
    assert all(r["exact"] and r["errors"] == 0 for r in results), results
    fanout = found["fanout"]
    assert fanout["events"] > 0 and fanout["lost"] == 0
    assert fanout["deliveries_received"] == fanout["events"] * fanout["subscribers"]
    latency = found["latency"]
    assert latency["deliveries_received"] == latency["events"] * latency["subscribers"]
    assert 0 < latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"]
    connections = found["connections"]
    assert connections["server_subscription_count"] == connections["connections"]
    assert connections["rss_after_kib"] > connections["rss_before_kib"] > 0
    assert found["http"]["deliveries"] == found["http"]["publishes"] > 0
    presence = found["presence"]
    assert presence["joins"] > 0 and presence["count_checks"] == 3
    assert presence["count_checks_failed"] == []
    for result in results:  # both sides' CPU beside every figure
        assert result["gen_cpu"] > 0 and result["server_cpu"] is not None
    assert "deliveries/s" in proc.stdout and "joins/s" in proc.stdout  # the closing table


def test_url_target_measures_a_running_server(server):
    proc, results = run_bench(
        "--quick", "--target", "url", "--ws-url", server.ws_url, "--http-url", server.url,
        "--app-id", APP_ID, "--key", KEY, "--secret", SECRET,
        "--server-pid", str(server.proc.pid), "fanout", "presence")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = by_scenario(results)
    assert found["fanout"]["exact"] and found["presence"]["exact"]
    assert found["fanout"]["server_us_per_delivery"] > 0


def test_wrong_secret_makes_the_run_fail(server):
    proc, results = run_bench(
        "--quick", "--target", "url", "--ws-url", server.ws_url, "--http-url", server.url,
        "--app-id", APP_ID, "--key", KEY, "--secret", "not-the-secret", "http")
    assert proc.returncode == 1
    (result,) = results
    assert result["exact"] is False and result["publish_errors"] > 0
    assert "401" in result["first_errors"][0]


def test_refuses_targets_off_this_machine():
    proc, _ = run_bench("--target", "url", "--ws-url", "ws://10.1.2.3:6001",
                        "--http-url", "http://10.1.2.3:6001", "--key", "k", "--secret", "s",
                        "http", timeout=30)
    assert proc.returncode != 0 and "loopback" in proc.stderr


def test_quick_fanout_under_gunicorn():
    proc, results = run_bench("--quick", "--target", "gunicorn", "--workers", "1", "fanout")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (result,) = results
    assert result["target"] == "gunicorn-1w" and result["exact"]


class Recorder:
    def __init__(self):
        self.messages, self.lost = [], []

    def on_message(self, ws, payload):
        self.messages.append(payload)

    def on_lost(self, ws, why):
        self.lost.append(why)


def test_frame_counter_is_exact_on_split_and_coalesced_frames():
    """A real socket feeds the generator the server's own frames (bunpulse's build_frame) in
    odd-sized pieces: every event is counted once and every control message arrives whole."""
    listener = socket.create_server(("127.0.0.1", 0))
    loop, owner = Loop(), Recorder()
    ws = Ws(loop, owner, 0, listener.getsockname(), b"GET / HTTP/1.1\r\n\r\n")
    peer, _ = listener.accept()
    loop.run_until(lambda: ws.state == HANDSHAKE and not ws.out, 5, "handshake sent")
    assert peer.recv(100).startswith(b"GET /")

    events = [build_frame(b'{"event":"e","data":"BPB|%d|0|' % i + b"x" * size + b'"}')
              for i, size in enumerate([0, 100, 150, 300, 70000, 5, 65530])]
    control = [build_frame(b'{"event":"pusher:pong","data":"{}"}'),
               build_frame(b'{"event":"other","data":"' + b"y" * 200 + b'"}')]
    stream = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n" + \
        b"".join(events[:3] + control[:1] + events[3:] + control[1:] + events * 2)
    want = len(events) * 3
    for start in range(0, len(stream), 997):  # pieces that split headers and payloads
        peer.sendall(stream[start:start + 997])
        loop.poll_once(0.01)
    loop.run_until(lambda: ws.count >= want and len(owner.messages) >= 2, 5, "frames")
    time.sleep(0.05)
    loop.poll_once(0)
    assert ws.count == loop.deliveries == want
    assert owner.messages == [c[2:] if c[1] < 126 else c[4:] for c in control]
    assert owner.lost == [] and ws.buf == b""
    peer.close()
    loop.run_until(lambda: owner.lost, 5, "EOF")
    loop.close()
    listener.close()

#!/usr/bin/env python3
"""What the debug dashboard costs on the fan-out path: alternated runs of
`scripts/bench.py fanout` against `python -m bunpulse` with the dashboard off, on with nobody
watching, and on with one viewer's event stream open (that viewer gets a log record for every
published event). Prints one JSON line per run and a table of medians.

    .venv/bin/python scripts/bench_dashboard.py --rounds 3 --duration 8
"""
import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP_ID, KEY, SECRET = "bench", "bench-key", "bench-secret"
MODES = ("off", "on, no viewer", "on, one viewer")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(dashboard, cpu):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BUNPULSE_", "PUSHER_"))}
    env.update({"PUSHER_APP_ID": APP_ID, "PUSHER_APP_KEY": KEY, "PUSHER_APP_SECRET": SECRET,
                "BUNPULSE_HOST": "127.0.0.1", "BUNPULSE_PORT": str(port),
                "BUNPULSE_LOG_LEVEL": "warning", "BUNPULSE_ENV_FILE": os.devnull,
                "BUNPULSE_DASHBOARD": "true" if dashboard else "false"})
    proc = subprocess.Popen([sys.executable, "-m", "bunpulse"], cwd=ROOT, env=env,
                            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if requests.get(url + "/health", timeout=0.5).ok:
                return proc, url, port
        except requests.RequestException:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the server did not start")


def open_viewer(url):
    """Sign in and keep the live log's event stream open, reading it; returns a stopper."""
    http = requests.Session()
    page = http.get(url + "/dashboard", timeout=5).text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    http.post(url + "/dashboard/sign-in", timeout=5,
              data={"app_id": APP_ID, "secret": SECRET, "csrf_token": token}).raise_for_status()
    stream = http.get(url + "/dashboard/events", stream=True, timeout=30)
    received = [0]

    def read():
        try:
            for line in stream.iter_lines(chunk_size=65536):
                if line.startswith(b"data: ["):
                    received[0] += 1
        except (requests.RequestException, AttributeError, ValueError):
            pass

    threading.Thread(target=read, daemon=True).start()
    return stream, received


def run(mode, args):
    proc, url, port = start_server(mode != "off", args.server_cpu)
    viewer = open_viewer(url) if mode == "on, one viewer" else None
    try:
        out = subprocess.run(
            [sys.executable, "scripts/bench.py", "fanout", "--target", "url", "--ws-url",
             f"ws://127.0.0.1:{port}", "--http-url", url, "--app-id", APP_ID, "--key", KEY,
             "--secret", SECRET, "--server-pid", str(proc.pid), "--duration",
             str(args.duration), "--subscribers", str(args.subscribers), "--gen-cpus",
             str(args.gen_cpu)], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        result = json.loads(out.splitlines()[0])
        result["mode"] = mode
        if viewer is not None:
            result["viewer_messages"] = viewer[1][0]
        return result
    finally:
        if viewer is not None:
            viewer[0].close()
        proc.terminate()
        proc.wait(10)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--gen-cpu", type=int, default=1)
    parser.add_argument("--no-viewer-mode", action="store_true",
                        help="only off and on-with-nobody-watching")
    args = parser.parse_args()
    modes = MODES[:2] if args.no_viewer_mode else MODES
    results = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode in modes:  # alternated: a noisy minute hits every mode alike
            result = run(mode, args)
            print(json.dumps(result), flush=True)
            results[mode].append(result)
    print(f"{'mode':<16}{'deliveries/s':>14}{'events/s':>10}{'server µs/delivery':>20}"
          f"{'srv cpu':>9}")
    for mode in modes:
        rows = results[mode]
        print(f"{mode:<16}{statistics.median(r['deliveries_per_s'] for r in rows):>14,.0f}"
              f"{statistics.median(r['events_per_s'] for r in rows):>10,.0f}"
              f"{statistics.median(r['server_us_per_delivery'] for r in rows):>20.2f}"
              f"{statistics.median(r['server_cpu'] for r in rows):>9.0%}")


if __name__ == "__main__":
    main()

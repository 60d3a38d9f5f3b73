"""The five scenarios (docs/benchmarks.md says what each measures). Each owns a loop and its
clients, and returns one result: a dict printed as a JSON line."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from bunpulse.apps import KeyPair
from bunpulse.signatures import channel_auth

from . import BenchError, log
from .loadgen import (EVENT, PING_FRAME, PONG_FRAME, Http, Loop, Ws, event_data, json_frame,
                      signed_path)
from .measure import SATURATED, Meter, percentile, proc_rss_kib
from .report import summarize_profile

MEMBER_EVENT = b'"pusher_internal:member_'


class Scenario:
    """Owns the loop and the clients of one scenario; subclasses implement `run`."""

    name = ""

    def __init__(self, server, options):
        self.server, self.opt = server, options
        self.loop = Loop()
        self.clients = []
        self.established = self.subscribed = self.failed = 0
        self.want_channel = {}     # client index -> channel to subscribe on connect
        self.member_events = 0
        self.profile = None

    # ---------------------------------------------------------------- callbacks

    def on_message(self, ws, payload):
        if MEMBER_EVENT in payload:  # presence churn sends many: counted, not parsed
            self.member_events += 1
            return
        try:
            message = json.loads(payload)
        except ValueError:
            self.loop.note_error(f"non-JSON message {payload[:60]!r}")
            return
        event = message.get("event")
        if event == "pusher:connection_established":
            ws.socket_id = json.loads(message["data"])["socket_id"]
            self.established += 1
            self.on_established(ws)
        elif event == "pusher_internal:subscription_succeeded":
            self.subscribed += 1
            ws.pending -= 1
            self.on_subscribed(ws, message)
        elif event == "pusher:ping":
            ws.send(PONG_FRAME)
        elif event == "pusher:pong":
            ws.pending -= 1
        elif event in ("pusher:error", "pusher:subscription_error"):
            self.loop.note_error(f"{event}: {message.get('data')}")
        else:
            self.on_other(ws, event, message)

    def on_lost(self, ws, why):
        self.failed += 1
        self.loop.note_error(f"client {ws.index}: {why}")

    def on_established(self, ws):
        channel = self.want_channel.get(ws.index)
        if channel is not None:
            self.subscribe(ws, channel)

    def on_subscribed(self, ws, message):
        pass

    def on_other(self, ws, event, message):
        pass

    def subscribe(self, ws, channel, extra=None):
        data = {"channel": channel}
        data.update(extra or {})
        ws.pending += 1
        ws.send(json_frame({"event": "pusher:subscribe", "data": data}))

    # ---------------------------------------------------------------- helpers

    def open_clients(self, count, channel_of=None, window=200, timeout=None):
        """Open `count` WebSocket clients, at most `window` handshakes at a time, each
        subscribed to channel_of(i) when given; return (connect/s, seconds)."""
        request = self.server.ws_request()
        first = len(self.clients)
        start_est, start_sub = self.established, self.subscribed
        launched = 0
        t0 = time.monotonic()

        def launch():
            nonlocal launched
            while launched < count and launched - (self.established - start_est) - \
                    self.failed < window:
                index = first + launched
                if channel_of is not None:
                    self.want_channel[index] = channel_of(index - first)
                self.clients.append(Ws(self.loop, self, index, self.server.ws_address,
                                       request))
                launched += 1
            return 0.05

        def done():
            if self.failed:
                raise BenchError(f"{self.failed} client(s) failed: {self.loop.errors[:3]}")
            if self.established - start_est < count:
                return False
            return channel_of is None or self.subscribed - start_sub >= count

        timeout = timeout or 10 + count / 200
        self.loop.run_until(done, timeout, f"{count} connections", tick=launch)
        elapsed = time.monotonic() - t0
        return count / elapsed, elapsed

    def http_clients(self, count, on_response):
        return [Http(self.loop, self.server.http_address, on_response) for _ in range(count)]

    def publish(self, client, channel, seq, ctx=None):
        body = json.dumps({"name": EVENT, "channel": channel, "data": event_data(seq)},
                          separators=(",", ":")).encode()
        path = f"/apps/{self.server.app_id}/events"
        client.request("POST", signed_path("POST", path, body, self.server.key,
                                           self.server.secret), body, ctx)

    def meter(self):
        return Meter(self.server.cpu_pids())

    def start_profile(self):
        if self.profile is None or not self.server.pids():
            return
        directory, run = self.profile
        out = os.path.join(directory, f"{self.name}-{run}.txt")
        pyspy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or \
            shutil.which("py-spy")
        if pyspy is None:
            log("py-spy not found: pip install -r requirements-dev.txt")
            return
        self._pyspy = (subprocess.Popen(
            [pyspy, "record", "--pid", str(self.server.pids()[0]), "--rate", "250",
             "--nonblocking", "--nolineno", "--format", "raw", "--output", out],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out)
        time.sleep(0.5)  # py-spy attaches

    def stop_profile(self):
        pyspy = getattr(self, "_pyspy", None)
        if pyspy is None:
            return
        proc, out = pyspy
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        self._pyspy = None
        if os.path.exists(out):
            summary = summarize_profile(out)
            with open(out[:-4] + "-summary.txt", "w") as handle:
                handle.write(summary)
            log(f"profile of {self.name}: {out}\n{summary}")

    def wait_vacated(self, channels, timeout=15):
        """Bounded wait until the server has cleaned up after the closed clients."""
        deadline = time.monotonic() + timeout
        for channel in channels:
            while self.server.channel_info(channel).get("occupied"):
                if time.monotonic() > deadline:
                    raise BenchError(f"{channel} still occupied {timeout}s after its clients "
                                     "left")
                time.sleep(0.05)

    def close(self):
        self.loop.close()
        self.clients = []

    def result(self, **fields):
        fields = {"scenario": self.name, "target": self.server.name, **fields}
        if getattr(self, "rate", None) is not None:
            fields.setdefault("rate", self.rate)
        fields["errors"] = self.loop.error_count
        if self.loop.errors:
            fields["first_errors"] = self.loop.errors[:3]
        gen = fields.get("gen_cpu")
        if gen is not None and gen >= SATURATED:
            fields["warning"] = (f"the load generator used {gen:.0%} of a core: the figure "
                                 "may be the generator's limit, not the server's")
        return fields


class Fanout(Scenario):
    """N subscribers on one channel; events published over the signed HTTP API as fast as the
    receivers take them (at most `window` events not yet received by everyone); every
    delivery counted at the receivers."""

    name = "fanout"

    def run(self):
        n, duration = self.opt.subscribers, self.opt.duration
        channel = f"fanout-{os.getpid()}-{time.monotonic_ns()}"
        self.open_clients(n, lambda i: channel)
        window, publishers = self.opt.window, 4
        state = {"seq": 0, "ok": 0, "bad": 0, "inflight": 0, "stop": True}

        def on_response(client, status, body, ctx, elapsed):
            state["inflight"] -= 1
            if status == 200:
                state["ok"] += 1
            else:
                state["bad"] += 1
                self.loop.note_error(f"publish: {status} {body[:80]!r}")
            pump()

        clients = self.http_clients(publishers, on_response)

        def pump():
            if state["stop"]:
                return 0.05
            for client in clients:
                outstanding = state["ok"] + state["inflight"] - self.loop.deliveries // n
                if client.busy or outstanding >= window:
                    continue
                state["seq"] += 1
                state["inflight"] += 1
                self.publish(client, channel, state["seq"])
            return 0.05

        # Warm-up: a few events, then count from zero.
        warm = min(20, window)
        for _ in range(warm):
            state["seq"] += 1
            state["inflight"] += 1
            client = clients[0]
            self.publish(client, channel, state["seq"])
            self.loop.run_until(lambda: not client.busy, 10, "warm-up publish")
        self.loop.run_until(lambda: self.loop.deliveries >= warm * n, 10, "warm-up deliveries")
        if state["ok"] != warm:
            raise BenchError(f"warm-up publishes failed: {self.loop.errors[:3]}")
        self.loop.deliveries, state["ok"] = 0, 0
        for ws in self.clients:
            ws.count = 0

        self.start_profile()
        meter = self.meter()
        end = time.monotonic() + duration
        state["stop"] = False
        pump()
        self.loop.run_until(lambda: time.monotonic() >= end, duration + 5, "publishing",
                            tick=pump, tick_every=0.01)
        state["stop"] = True
        # Drain: every accepted event must reach every subscriber (bounded wait).
        try:
            self.loop.run_until(lambda: state["inflight"] == 0 and
                                self.loop.deliveries >= state["ok"] * n, 10 + window, "drain")
        except BenchError as exc:
            self.loop.note_error(str(exc))
        figures = meter.stop()
        self.stop_profile()
        # Anything late still counts as received (and shows up as a duplicate if over).
        settle = time.monotonic() + 0.2
        self.loop.run_until(lambda: time.monotonic() >= settle, 1, "settle")
        expected = state["ok"] * n
        received = self.loop.deliveries
        short = sum(1 for ws in self.clients if ws.count < state["ok"])
        over = sum(1 for ws in self.clients if ws.count > state["ok"])
        cpu_s = figures.pop("_server_cpu_s")
        exact = received == expected and not short and not over and not state["bad"] and \
            not self.failed
        return self.result(
            subscribers=n, events=state["ok"], publish_errors=state["bad"],
            deliveries_expected=expected, deliveries_received=received,
            lost=max(0, expected - received), receivers_short=short, receivers_over=over,
            deliveries_per_s=round(received / figures["wall_s"]),
            events_per_s=round(state["ok"] / figures["wall_s"], 1),
            server_us_per_delivery=round(cpu_s / received * 1e6, 2) if received and
            meter.pids else None,
            exact=exact, **figures)


class Latency(Scenario):
    """N subscribers, events published at a steady rate; publish-to-receive time of every
    delivery, from the send time embedded in the payload."""

    name = "latency"

    def __init__(self, server, options, rate):
        super().__init__(server, options)
        self.rate = rate

    def run(self):
        n, duration, rate = self.opt.subscribers, self.opt.duration, self.rate
        channel = f"latency-{rate}-{time.monotonic_ns()}"
        self.open_clients(n, lambda i: channel)
        state = {"sent": 0, "ok": 0, "bad": 0, "late_max": 0.0, "queued": 0, "seqsum": 0}

        def on_response(client, status, body, ctx, elapsed):
            if status == 200:
                state["ok"] += 1
                state["seqsum"] += ctx
            else:
                state["bad"] += 1
                self.loop.note_error(f"publish: {status} {body[:80]!r}")

        clients = self.http_clients(8, on_response)
        total = max(1, int(duration * rate))
        # Warm-up (not timed): one event through every subscriber.
        self.publish(clients[0], channel, 0, 0)
        self.loop.run_until(lambda: self.loop.deliveries >= n and not clients[0].busy, 10,
                            "warm-up")
        self.loop.deliveries, state["ok"], state["seqsum"] = 0, 0, 0
        for ws in self.clients:
            ws.count = ws.checksum = 0
        self.loop.latencies = latencies = []

        meter = self.meter()
        t0 = time.monotonic()

        def tick():
            now = time.monotonic()
            while state["sent"] < total:
                due = t0 + state["sent"] / rate
                if due > now:
                    return due - now
                client = next((c for c in clients if not c.busy), None)
                if client is None:  # every publisher waits on the server: a backlog
                    state["queued"] += 1
                    return 0.0005
                state["late_max"] = max(state["late_max"], now - due)
                state["sent"] += 1
                self.publish(client, channel, state["sent"], state["sent"])
            return 0.05

        self.loop.run_until(lambda: state["sent"] >= total, duration * 3 + 10, "publishing",
                            tick=tick, tick_every=0.005)
        try:
            self.loop.run_until(lambda: not any(c.busy for c in clients) and
                                self.loop.deliveries >= state["ok"] * n,
                                10 + duration, "deliveries")
        except BenchError as exc:
            self.loop.note_error(str(exc))
        figures = meter.stop()
        expected = state["ok"] * n
        received = self.loop.deliveries
        bad_receivers = sum(1 for ws in self.clients
                            if ws.count != state["ok"] or ws.checksum != state["seqsum"])
        latencies.sort()
        ms = [None if v is None else round(v / 1e6, 2) for v in
              (percentile(latencies, 0.5), percentile(latencies, 0.9),
               percentile(latencies, 0.99), latencies[-1] if latencies else None)]
        cpu_s = figures.pop("_server_cpu_s")
        exact = received == expected and not bad_receivers and not state["bad"] and \
            not self.failed
        return self.result(
            subscribers=n, rate=rate, events=state["ok"], publish_errors=state["bad"],
            deliveries_expected=expected, deliveries_received=received,
            lost=max(0, expected - received), receivers_inexact=bad_receivers,
            p50_ms=ms[0], p90_ms=ms[1], p99_ms=ms[2], max_ms=ms[3],
            publish_lag_max_ms=round(state["late_max"] * 1000, 2),
            publisher_backlog_ticks=state["queued"],
            server_us_per_delivery=round(cpu_s / received * 1e6, 2) if received and
            meter.pids else None,
            exact=exact, **figures)


class Connections(Scenario):
    """C idle, subscribed connections: the server's RSS before and after, and the connect
    rate; the server's subscription counts are checked exactly over the HTTP API."""

    name = "connections"

    def run(self):
        count = self.opt.connections
        channels = [f"idle-{i}" for i in range(min(100, count))]
        pids = self.server.pids()
        time.sleep(0.5)
        before = sum(proc_rss_kib(pid) for pid in pids)
        self.start_profile()
        meter = self.meter()
        rate, elapsed = self.open_clients(count, lambda i: channels[i % len(channels)],
                                          window=self.opt.connect_window)
        figures = meter.stop()
        self.stop_profile()
        # Idle for a moment, answering pings, so that the server settles.
        idle_end = time.monotonic() + self.opt.idle
        self.loop.run_until(lambda: time.monotonic() >= idle_end, self.opt.idle + 1, "idle")
        after = sum(proc_rss_kib(pid) for pid in pids)
        counted = 0
        for channel in channels:
            counted += self.server.channel_info(channel, "subscription_count").get(
                "subscription_count", 0)
        self.close()
        # After the clients leave: what the server gives back.
        if pids:
            self.wait_vacated(channels[:1], timeout=30)
            time.sleep(1)
        released = sum(proc_rss_kib(pid) for pid in pids)
        cpu_s = figures.pop("_server_cpu_s")
        per_conn = (after - before) / count if pids else None
        return self.result(
            connections=count, connected=self.established, subscribed=self.subscribed,
            server_subscription_count=counted,
            connects_per_s=round(rate), connect_seconds=round(elapsed, 2),
            rss_before_kib=before or None, rss_after_kib=after or None,
            rss_after_close_kib=released or None,
            kib_per_connection=round(per_conn, 2) if per_conn is not None else None,
            server_ms_per_connect=round(cpu_s / count * 1000, 3) if pids else None,
            exact=self.established == count and self.subscribed == count and counted == count
            and not self.failed, **figures)


class HttpPublish(Scenario):
    """Signed publishes over keep-alive connections from several concurrent clients; one
    subscriber checks that every accepted event is delivered once."""

    name = "http"

    def run(self):
        duration, concurrency = self.opt.duration, self.opt.http_clients
        channel = f"http-{time.monotonic_ns()}"
        self.open_clients(1, lambda i: channel)
        state = {"seq": 0, "ok": 0, "bad": 0, "stop": True, "inflight": 0}
        timings = []

        def on_response(client, status, body, ctx, elapsed):
            state["inflight"] -= 1
            if status == 200:
                state["ok"] += 1
                timings.append(elapsed)
            else:
                state["bad"] += 1
                self.loop.note_error(f"publish: {status} {body[:80]!r}")
            if not state["stop"]:
                send(client)

        def send(client):
            state["seq"] += 1
            state["inflight"] += 1
            self.publish(client, channel, state["seq"])

        clients = self.http_clients(concurrency, on_response)
        for client in clients:  # warm-up: one each, delivered before counting starts
            send(client)
        self.loop.run_until(lambda: state["inflight"] == 0 and
                            self.loop.deliveries >= state["ok"], 10, "warm-up")
        self.loop.deliveries, state["ok"], timings[:] = 0, 0, []
        self.start_profile()
        meter = self.meter()
        state["stop"] = False
        for client in clients:
            send(client)
        end = time.monotonic() + duration
        self.loop.run_until(lambda: time.monotonic() >= end, duration + 5, "publishing",
                            tick=lambda: end - time.monotonic())
        state["stop"] = True
        self.loop.run_until(lambda: state["inflight"] == 0, 10, "last responses")
        figures = meter.stop()
        self.stop_profile()
        try:
            self.loop.run_until(lambda: self.loop.deliveries >= state["ok"], 10, "deliveries")
        except BenchError as exc:
            self.loop.note_error(str(exc))
        timings.sort()
        cpu_s = figures.pop("_server_cpu_s")
        return self.result(
            clients=concurrency, publishes=state["ok"], publish_errors=state["bad"],
            publishes_per_s=round(state["ok"] / figures["wall_s"]),
            p50_ms=round(percentile(timings, 0.5) / 1e6, 2) if timings else None,
            p99_ms=round(percentile(timings, 0.99) / 1e6, 2) if timings else None,
            deliveries=self.loop.deliveries,
            server_us_per_publish=round(cpu_s / state["ok"] * 1e6, 1) if state["ok"] and
            meter.pids else None,
            exact=self.loop.deliveries == state["ok"] and not state["bad"] and not self.failed,
            **figures)


class Presence(Scenario):
    """Join/leave churn on presence channels: each client leaves and re-joins as soon as its
    last join succeeded. Member counts and rosters are checked exactly over the HTTP API once
    everybody has joined, after the churn, and after everybody has left."""

    name = "presence"

    def run(self):
        clients, nchannels = self.opt.presence_clients, self.opt.presence_channels
        tag = time.monotonic_ns()
        channels = [f"presence-bench-{tag}-{c}" for c in range(nchannels)]
        self.members = {channel: set() for channel in channels}
        self.churning = False
        self.roster_bad = 0
        self.open_clients(clients)
        self.frames = {}
        for ws in self.clients:
            channel = channels[ws.index % nchannels]
            user = f"u{ws.index}"
            data = json.dumps({"user_id": user, "user_info": {"n": ws.index}})
            auth = channel_auth(self.server, ws.socket_id, channel, data,
                                pair=KeyPair(self.server.key, self.server.secret))
            ws.user = (channel, user)
            self.members[channel].add(user)
            subscribe = json_frame({"event": "pusher:subscribe", "data": {
                "channel": channel, "auth": auth, "channel_data": data}})
            unsubscribe = json_frame({"event": "pusher:unsubscribe",
                                      "data": {"channel": channel}})
            self.frames[ws.index] = (subscribe, unsubscribe + subscribe, unsubscribe + PING_FRAME)
        per_channel = {c: len(m) for c, m in self.members.items()}
        self.per_channel = per_channel

        base = self.subscribed
        for ws in self.clients:
            ws.pending += 1
            ws.send(self.frames[ws.index][0])
        self.loop.run_until(lambda: self.subscribed - base >= clients, 10 + clients / 100,
                            "presence joins")
        checks = [self.check("after joining")]

        self.start_profile()
        meter = self.meter()
        base = self.subscribed
        self.churning = True
        end = time.monotonic() + self.opt.duration
        for ws in self.clients:
            self.churn(ws)
        self.loop.run_until(lambda: time.monotonic() >= end, self.opt.duration + 5, "churn",
                            tick=lambda: end - time.monotonic())
        self.churning = False
        self.loop.run_until(lambda: not any(ws.pending for ws in self.clients), 10,
                            "the last joins")
        figures = meter.stop()
        self.stop_profile()
        joins = self.subscribed - base
        checks.append(self.check("after churn"))

        for ws in self.clients:  # everybody leaves; a pong says the server has read it
            ws.pending += 1
            ws.send(self.frames[ws.index][2])
        self.loop.run_until(lambda: not any(ws.pending for ws in self.clients), 10, "leaves")
        checks.append(self.check("after leaving", empty=True))
        cpu_s = figures.pop("_server_cpu_s")
        failed_checks = [c for c in checks if c is not True]
        return self.result(
            clients=clients, channels=nchannels, joins=joins,
            subscriptions_per_s=round(joins / figures["wall_s"]),
            member_events_received=self.member_events, roster_out_of_range=self.roster_bad,
            count_checks=len(checks), count_checks_failed=failed_checks,
            server_us_per_join=round(cpu_s / joins * 1e6, 1) if joins and meter.pids
            else None,
            exact=not failed_checks and not self.roster_bad and not self.failed and
            not self.loop.error_count, **figures)

    def churn(self, ws):
        ws.pending += 1
        ws.send(self.frames[ws.index][1])

    def on_subscribed(self, ws, message):
        try:
            count = json.loads(message["data"])["presence"]["count"]
        except (KeyError, TypeError, ValueError):
            count = -1
        if not 1 <= count <= self.per_channel[ws.user[0]]:
            self.roster_bad += 1
        if self.churning:
            self.churn(ws)

    def check(self, when, empty=False):
        """user_count of each channel and the roster of one, exactly as expected."""
        for channel, members in self.members.items():
            info = self.server.channel_info(channel, "user_count")
            want = 0 if empty else len(members)
            got = info.get("user_count", 0) if info.get("occupied") else 0
            if got != want:
                return f"{when}: {channel} user_count {got}, expected {want}"
        channel = next(iter(self.members))
        users = self.server.api_get(f"/apps/{self.server.app_id}/channels/{channel}/users")
        ids = {u["id"] for u in users.get("users", [])}
        want = set() if empty else self.members[channel]
        if ids != want:
            return f"{when}: {channel} roster has {len(ids)} users, expected {len(want)}"
        return True


SCENARIOS = ("fanout", "latency", "connections", "http", "presence")

"""The command line of scripts/bench.py: parse the flags, start the server under test, run the
scenarios asked for, print one JSON line per run and the table."""
import argparse
import json
import os
import signal
import sys

from . import BenchError, log
from .loadgen import raise_fd_limit
from .report import print_table
from .scenarios import SCENARIOS, Connections, Fanout, HttpPublish, Latency, Presence
from .servers import ROOT, GunicornServer, LocalServer, ServerUnderTest

DESCRIPTION = "BunPulse benchmark suite: one command, five scenarios, exact counts."


def build_parser():
    parser = argparse.ArgumentParser(
        prog="scripts/bench.py", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help=f"any of {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--target", choices=("local", "gunicorn", "url"), default="local")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers")
    parser.add_argument("--redis-url", help="Redis for --workers above 1 (else one is started)")
    parser.add_argument("--ws-url", help="url target: ws://127.0.0.1:PORT")
    parser.add_argument("--http-url", help="url target: http://127.0.0.1:PORT")
    parser.add_argument("--app-id", default="1")
    parser.add_argument("--key")
    parser.add_argument("--secret")
    parser.add_argument("--server-root", default=ROOT, metavar="DIR",
                        help="local and gunicorn targets: run the bunpulse package found in DIR "
                             "(another checkout, for before/after comparisons)")
    parser.add_argument("--server-pid", type=int, action="append", default=[],
                        help="url target: a server process to measure (CPU, RSS); repeatable")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, a few seconds in all; exit 1 on an inexact count")
    parser.add_argument("--runs", type=int, default=1, help="repeat each scenario; the table "
                                                             "shows medians")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured")
    parser.add_argument("--subscribers", type=int, default=1000, help="fanout and latency")
    parser.add_argument("--window", type=int, default=100,
                        help="fanout: events in flight (published, not yet received by all)")
    parser.add_argument("--rates", default="20,200",
                        help="latency: events a second, one run per rate")
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--connect-window", type=int, default=200,
                        help="handshakes in flight at once")
    parser.add_argument("--idle", type=float, default=2.0,
                        help="connections: seconds idle before the RSS is read")
    parser.add_argument("--http-clients", type=int, default=8)
    parser.add_argument("--presence-clients", type=int, default=200)
    parser.add_argument("--presence-channels", type=int, default=20)
    parser.add_argument("--server-cpus", default="auto",
                        help="CPUs the server is pinned to (default: 0 for one process)")
    parser.add_argument("--gen-cpus", default="auto",
                        help="CPUs the generator is pinned to (default: 1 for one process)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="local and gunicorn targets: a setting for the server, e.g. "
                             "BUNPULSE_METRICS_PORT=0 (metrics on); repeatable")
    parser.add_argument("--profile", metavar="DIR",
                        help="record the server with py-spy during fanout, connections (the "
                             "connects), http and presence")
    return parser


def parse_cpus(text):
    if text in (None, "", "none"):
        return None
    cpus = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def server_under_test(args, server_cpus):
    """What --target names: a server started here, or the one at --ws-url/--http-url."""
    env = dict(pair.partition("=")[::2] for pair in args.server_env)
    if args.target == "local":
        return LocalServer(server_cpus, env=env, root=args.server_root)
    if args.target == "gunicorn":
        return GunicornServer(server_cpus, args.workers, args.redis_url, args.server_root,
                              env=env)
    missing = [flag for flag, value in (("--ws-url", args.ws_url), ("--http-url", args.http_url),
                                        ("--key", args.key), ("--secret", args.secret))
               if not value]
    if missing:
        raise SystemExit(f"bench: --target url needs {', '.join(missing)}")
    return ServerUnderTest(args.ws_url, args.http_url, args.app_id, args.key, args.secret,
                           args.server_pid)


def quick_sizes(args):
    args.duration = min(args.duration, 1.0)
    args.subscribers = min(args.subscribers, 50)
    args.connections = min(args.connections, 200)
    args.rates = "20"
    args.idle = 0.2
    args.http_clients = min(args.http_clients, 4)
    args.presence_clients = min(args.presence_clients, 40)
    args.presence_channels = min(args.presence_channels, 4)


def scenario_runs(args):
    """(name, factory(server)) for each scenario asked for, a latency run per rate."""
    for name in args.scenarios or SCENARIOS:
        if name == "latency":
            for rate in [float(r) for r in args.rates.split(",") if r]:
                yield name, lambda server, rate=rate: Latency(server, args, rate)
        else:
            cls = {"fanout": Fanout, "connections": Connections, "http": HttpPublish,
                   "presence": Presence}[name]
            yield name, lambda server, cls=cls: cls(server, args)


def main(argv=None):
    args = build_parser().parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        raise SystemExit(f"bench: unknown scenario {', '.join(unknown)}")
    if args.quick:
        quick_sizes(args)
    one_process = args.target == "local" or (args.target == "gunicorn" and args.workers == 1)
    server_cpus = parse_cpus({"auto": "0" if one_process else None}.get(args.server_cpus,
                                                                        args.server_cpus))
    gen_cpus = parse_cpus({"auto": "1" if one_process and os.cpu_count() > 1 else None}.get(
        args.gen_cpus, args.gen_cpus))
    limit = raise_fd_limit(max(args.connections, args.subscribers) + 1024)
    if limit < args.connections + 256:
        raise SystemExit(f"bench: the open-file limit is {limit}: too low for "
                         f"{args.connections} connections (raise the hard limit)")
    if gen_cpus:
        os.sched_setaffinity(0, gen_cpus)
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    # A SIGTERM still runs the `finally` below, which stops the server this run started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server = server_under_test(args, server_cpus)
    log(f"target {server.name}: ws {server.ws_address}, http {server.http_address}, server "
        f"pids {server.pids()}, server cpus {sorted(server_cpus or [])}, generator cpus "
        f"{sorted(gen_cpus or [])}")
    groups, inexact = {}, False
    try:
        for name, make in scenario_runs(args):
            for run in range(args.runs):
                if name == "connections" and isinstance(server, LocalServer):
                    # A fresh server: one that has served connections before keeps the memory
                    # they freed and reuses it, which would hide the cost of new ones.
                    server.stop()
                    server = server_under_test(args, server_cpus)
                scenario = make(server)
                if args.profile and name in ("fanout", "connections", "http", "presence"):
                    scenario.profile = (args.profile, run)
                log(f"{name} run {run + 1}/{args.runs}")
                try:
                    result = scenario.run()
                except BenchError as exc:
                    result = scenario.result(exact=False, failed=str(exc))
                finally:
                    scenario.close()
                result["run"] = run + 1
                print(json.dumps(result), flush=True)
                if result.get("warning"):
                    log("WARNING: " + result["warning"])
                if not result.get("exact"):
                    inexact = True
                key = (name, result.get("rate"))
                groups.setdefault(key, []).append(result)
                if isinstance(server, LocalServer) and server.proc.poll() is not None:
                    raise BenchError(f"the server died:\n{server.log_tail()}")
    finally:
        server.stop()
    print_table(list(groups.values()))
    if inexact:
        log("some counts were inexact (see 'exact' and 'first_errors' above)")
    return 1 if inexact else 0

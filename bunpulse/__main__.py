"""`python -m bunpulse`: the embedded gevent server; `python -m bunpulse apps ...`: the apps
command (apps_cli.py)."""
from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402 - after monkey-patching, as gevent requires

from .config import ConfigError, build_parser, load_settings  # noqa: E402


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["apps"]:  # the apps command: changes the store, serves nothing
        from .apps_cli import main as apps_main
        return apps_main(argv[1:])
    build_parser().parse_args(argv)  # --help exits here, before anything starts
    try:
        settings = load_settings(argv)
        from .logs import configure
        from .serving.embedded import serve_forever
        configure(settings.log_level, settings.log_format)
        serve_forever(settings)
    except ConfigError as exc:
        print(f"bunpulse: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"bunpulse: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

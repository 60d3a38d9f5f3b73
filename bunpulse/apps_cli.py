"""`python -m bunpulse apps <command>`: add, list, show, update, disable, enable, rotate
secrets of and delete the apps of the configured store (app_store.py), while servers run.

A secret is printed once: by `add` and `rotate-secret`, never by `list` or `show`. Errors are
one line on stderr and exit status 2.
"""
import argparse
import json
import secrets
import sys

from .app_store import FileAppStore, StoreError
from .apps import environment_apps
from .config import ConfigError, load_settings

PROG = "python -m bunpulse apps"
# What `update` may not set: the id names the app, and pairs change by rotation only.
_NOT_UPDATED = ("id", "key", "secret", "keys")


def _new_key():
    return secrets.token_hex(10)  # 20 hex characters, as Pusher's keys


def _new_secret():
    return secrets.token_hex(16)


def _field(text):
    """NAME=VALUE, VALUE as JSON (100, true, [..]) or else as a string."""
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: must be FIELD=VALUE")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Manage the apps of the apps file (--apps-file or BUNPULSE_APPS_FILE) "
                    "while servers run: each change is written atomically and taken by every "
                    "worker within --apps-file-reload seconds. Secrets are shown once, by add "
                    "and rotate-secret.")
    # Before the command or after it: both parsers take them (the command's if given twice).
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for holder in (parser, common):
        holder.add_argument("--apps-file", metavar="PATH",
                            help="the apps file [env BUNPULSE_APPS_FILE, or its line in .env]")
        holder.add_argument("--json", action="store_true",
                            help="print one JSON document, for scripts")
    parser.set_defaults(apps_file=None, json=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name, help_text, app_id=True):
        sub = commands.add_parser(name, parents=[common], help=help_text,
                                  description=help_text)
        if app_id:
            sub.add_argument("id", metavar="ID", help="the app's id")
        return sub

    add = command("add", "add an app; its key and secret are generated unless given, and "
                  "the secret is printed this once", app_id=False)
    add.add_argument("--id", required=True, help="the new app's id")
    add.add_argument("--key", help="its key (default: 20 random hex characters)")
    add.add_argument("--secret", help="its secret (default: 32 random hex characters)")
    add.add_argument("--set", metavar="FIELD=VALUE", type=_field, action="append", default=[],
                     help="any other field of the apps file (max_connections=100, "
                          "client_events=false, webhooks='[{\"url\": ...}]'), VALUE as JSON "
                          "or else a string; repeat it for more")
    command("list", "list the apps: id, keys and whether enabled (no secret)", app_id=False)
    command("show", "show one app's fields (its keys, no secret)")
    update = command("update", "change fields of an app")
    update.add_argument("--set", metavar="FIELD=VALUE", type=_field, action="append",
                        default=[], help="set a field, as for add; repeat it for more")
    update.add_argument("--unset", metavar="FIELD", action="append", default=[],
                        help="remove a field: its default applies; repeat it for more")
    command("disable", "disable an app: new connections get 4003, API calls 403")
    command("enable", "enable a disabled app")
    command("rotate-secret", "rotation step 1: add a new key/secret pair beside the app's "
            "others (the primary stays); the new secret is printed this once")
    promote = command("promote-key", "rotation step 3: make the pair of KEY the primary one "
                      "(it signs the webhooks); the primary before stays active beside it")
    promote.add_argument("key", metavar="KEY", help="an active key of the app")
    retire = command("retire-key", "rotation step 4: remove the pair of KEY (not the "
                     "primary): new connections and API calls with it are refused")
    retire.add_argument("key", metavar="KEY", help="an active key of the app, not the primary")
    command("delete", "delete an app")
    return parser


def _store(args):
    """The store the settings name (flag, environment, .env), as the server resolves them."""
    try:
        settings = load_settings(["--apps-file", args.apps_file] if args.apps_file else [])
    except ConfigError as exc:
        raise StoreError(f"configuration error: {exc}") from None
    if not settings.apps_file:
        raise StoreError("no apps store: give --apps-file PATH or set BUNPULSE_APPS_FILE")
    return FileAppStore(settings.apps_file, taken=environment_apps(settings))


def _pairs(record):
    """Every pair of a record, the primary first, as (key, secret)."""
    pairs = [(pair["key"], pair["secret"]) for pair in record.get("keys", [])]
    if "key" in record:
        pairs.insert(0, (record["key"], record["secret"]))
    return pairs


def _without_pairs(record):
    """What a record says, its secrets left out: `keys` lists every key, the primary first."""
    shown = {name: value for name, value in record.items() if name not in _NOT_UPDATED}
    return {"id": str(record["id"]), "keys": [key for key, _ in _pairs(record)], **shown}


def _with_pairs(record, pairs):
    """The record with `pairs` (the primary first) as its key, secret and keys."""
    record = {name: value for name, value in record.items() if name not in _NOT_UPDATED[1:]}
    record["key"], record["secret"] = pairs[0]
    if pairs[1:]:
        record["keys"] = [{"key": key, "secret": secret} for key, secret in pairs[1:]]
    return record


def _fields(pairs, command):
    fields = dict(pairs)
    refused = [name for name in fields if name in _NOT_UPDATED]
    if refused:
        raise StoreError(f"{command}: {refused[0]!r} cannot be set here (the id names the app; "
                         "pairs change with rotate-secret, promote-key and retire-key)")
    return fields


def run(args):
    """Do the command; return what to print: (text, document)."""
    store = _store(args)
    if args.command == "list":
        shown = [_without_pairs(record) for record in store.records()]
        lines = [f"{app['id']}\t{'enabled' if app.get('enabled', True) else 'disabled'}\t"
                 f"{','.join(app['keys'])}" for app in shown]
        return "\n".join(["id\tstate\tkeys"] + lines), shown
    if args.command == "add":
        pairs = [(args.key or _new_key(), args.secret or _new_secret())]
        record = _with_pairs({"id": args.id, **_fields(args.set, "add")}, pairs)
        store.add(record)
        return (f"added app {args.id}\nkey:    {pairs[0][0]}\nsecret: {pairs[0][1]}\n"
                "(the secret is not shown again)",
                {**_without_pairs(record), "key": pairs[0][0], "secret": pairs[0][1]})
    record = store.get(args.id)
    if args.command == "show":
        shown = _without_pairs(record)
        return "\n".join(f"{name}: {json.dumps(value)}" for name, value in shown.items()), shown
    if args.command == "delete":
        store.delete(args.id)
        return f"deleted app {args.id}", {"id": str(args.id), "deleted": True}
    pairs, extra, message = _pairs(record), {}, None
    if args.command in ("disable", "enable"):
        record = {**record, "enabled": args.command == "enable"}
        message = f"app {args.id} {args.command}d"
    elif args.command == "update":
        record = {**record, **_fields(args.set, "update")}
        for name in args.unset:
            if name in _NOT_UPDATED or name not in record:
                raise StoreError(f"update: app {args.id} has no field {name!r} to unset")
            del record[name]
        message = f"app {args.id} updated"
    elif args.command == "rotate-secret":
        pair = (_new_key(), _new_secret())
        pairs.append(pair)
        extra = {"new_key": pair[0], "new_secret": pair[1]}
        message = (f"app {args.id}: new pair added beside the primary {pairs[0][0]}\n"
                   f"key:    {pair[0]}\nsecret: {pair[1]}\n(the secret is not shown again; "
                   f"next: promote-key {args.id} {pair[0]}, then retire-key the old one)")
    elif args.command in ("promote-key", "retire-key"):
        index = next((i for i, (key, _) in enumerate(pairs) if key == args.key), None)
        if index is None:
            raise StoreError(f"app {args.id} has no key {args.key!r}")
        if args.command == "promote-key":
            pairs.insert(0, pairs.pop(index))
            message = f"app {args.id}: {args.key} is the primary key"
        elif index == 0:
            raise StoreError(f"app {args.id}: {args.key!r} is the primary key; promote another "
                             "one first (promote-key)")
        else:
            del pairs[index]
            message = f"app {args.id}: key {args.key} retired"
    record = _with_pairs(record, pairs)
    store.replace(args.id, record)
    return message, {**_without_pairs(record), **extra}


def main(argv):
    args = build_parser().parse_args(argv)  # a usage error exits 2 here
    try:
        text, document = run(args)
    except StoreError as exc:
        print(f"bunpulse apps: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(document, indent=2) if args.json else text)
    return 0

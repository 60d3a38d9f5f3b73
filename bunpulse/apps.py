"""The app record (credentials, limits, webhooks) and lookup by key or id."""
import dataclasses
import json
import re

from .config import DEV_APP, ConfigError
from .origins import ANY, AllowedOrigins

WEBHOOK_EVENTS = frozenset(("channel_occupied", "channel_vacated", "member_added",
                            "member_removed", "client_event", "cache_miss",
                            "subscription_count"))


# Headers a target may not set: BunPulse writes them, and the receiver checks them.
RESERVED_HEADERS = frozenset(("content-type", "content-length", "transfer-encoding", "host",
                              "connection", "x-pusher-key", "x-pusher-signature",
                              "x-bunpulse-webhook-id"))
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110)
_WEBHOOK_FIELDS = ("url", "event_types", "filter", "headers")
_FILTER_FIELDS = ("channel_name_starts_with", "channel_name_ends_with")


@dataclasses.dataclass(frozen=True)
class WebhookTarget:
    url: str
    event_types: frozenset = WEBHOOK_EVENTS
    # soketi's filter: only events of channels whose name starts / ends so ("" takes all)
    channel_name_starts_with: str = ""
    channel_name_ends_with: str = ""
    headers: tuple = ()  # (name, value) pairs sent with each request

    def wants(self, name):
        return name in self.event_types

    def takes(self, event):
        """Whether this target receives `event` (a webhook event with a channel)."""
        channel = event.get("channel") or ""
        return event["name"] in self.event_types and \
            channel.startswith(self.channel_name_starts_with) and \
            channel.endswith(self.channel_name_ends_with)


@dataclasses.dataclass(frozen=True)
class KeyPair:
    """One key/secret pair of an app: a client connects with the key, and what names the key
    (an API call's auth_key, the "key:" of an auth signature) is verified with its secret."""
    key: str
    secret: str


@dataclasses.dataclass(frozen=True)
class App:
    id: str
    key: str                                 # the primary pair: it signs the webhooks
    secret: str
    enabled: bool = True
    client_events: bool = True
    max_connections: int = 0                 # 0: no limit
    max_client_events_per_second: int = 10
    user_authentication_timeout: int = 0     # ms to sign in or join a private channel; 0: off
    max_event_data_size: int = 10240         # bytes
    max_channels_per_event: int = 100
    max_batch_size: int = 10
    max_channel_name_length: int = 200
    max_event_name_length: int = 200
    max_presence_members: int = 100
    max_presence_member_size_in_kb: int = 1  # user_info of one member (Pusher: 1 KB)
    # HTTP API rates (rates.py), soketi's names; 0: no limit
    max_backend_events_per_second: int = 0   # each channel of each event triggered
    max_read_requests_per_second: int = 0    # GET channels, channel, users
    allowed_origins: AllowedOrigins = ANY    # pages that may connect (origins.py)
    webhooks: tuple = ()
    subscription_count: bool = False         # pusher_internal:subscription_count (Pusher's)
    keys: tuple = ()  # KeyPairs active beside the primary one (a rotation's overlap)

    @property
    def pairs(self):
        """Every active pair, the primary first."""
        return (KeyPair(self.key, self.secret),) + self.keys

    def secret_for(self, key):
        """The secret of the active pair whose key is `key`, or None (a key is public: how
        long finding it takes tells nothing)."""
        if key == self.key:
            return self.secret
        for pair in self.keys:
            if pair.key == key:
                return pair.secret
        return None


_FIELDS = {f.name: f for f in dataclasses.fields(App)}
_AT_LEAST_ONE = ("max_presence_member_size_in_kb",)


class AppRegistry:
    def __init__(self, apps):
        self._by_key = {}
        self._by_id = {}
        for app in apps:
            named = [(self._by_key, pair.key, "key") for pair in app.pairs]
            for index, value, what in named + [(self._by_id, app.id, "id")]:
                if value in index:
                    raise ConfigError(f"two apps share the {what} {value!r}")
                index[value] = app

    def by_key(self, key):
        return self._by_key.get(key)

    def by_id(self, app_id):
        return self._by_id.get(str(app_id))

    def __iter__(self):
        return iter(self._by_id.values())

    def __len__(self):
        return len(self._by_id)


def _targets(settings):
    targets = []
    if settings.webhook_url:
        targets.append(WebhookTarget(settings.webhook_url))
    if settings.subscription_vacancy_url and \
            settings.subscription_vacancy_url != settings.webhook_url:  # else it would get two
        targets.append(WebhookTarget(settings.subscription_vacancy_url,
                                     frozenset(("channel_vacated",))))
    return tuple(targets)


def _unknown(raw, known, spot):
    """ConfigError naming the first key of `raw` that is not `known` (a misspelt key would
    otherwise be ignored, and its setting with it)."""
    for name in raw:
        if name not in known:
            hint = _snake(name)
            raise ConfigError(f"{spot}: unknown field {name!r}" + (
                f" (BunPulse's name: {hint!r})" if hint != name and hint in known else
                f"; known: {', '.join(known)}" if len(known) <= 6 else ""))


def _snake(name):
    """soketi's camelCase names as BunPulse spells them (maxConnections: max_connections)."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def _parse_webhooks(raw, where):
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: field 'webhooks' must be a list")
    targets = []
    for n, hook in enumerate(raw):
        spot = f"{where}: webhooks[{n}]"
        if not isinstance(hook, dict):
            raise ConfigError(f"{spot}: each webhook must be a JSON object with a 'url'")
        _unknown(hook, _WEBHOOK_FIELDS, spot)
        if not isinstance(hook.get("url"), str) \
                or not hook["url"].startswith(("http://", "https://")):
            raise ConfigError(f"{spot}: field 'url' must be an http(s) URL")
        types = hook.get("event_types", sorted(WEBHOOK_EVENTS))
        if not isinstance(types, list) or not set(types) <= WEBHOOK_EVENTS:
            raise ConfigError(f"{spot}: field 'event_types' must list some of "
                              f"{', '.join(sorted(WEBHOOK_EVENTS))}")
        targets.append(WebhookTarget(hook["url"], frozenset(types),
                                     **_parse_filter(hook.get("filter", {}), spot),
                                     headers=_parse_headers(hook.get("headers", {}), spot)))
    return tuple(targets)


def _parse_filter(raw, spot):
    if not isinstance(raw, dict):
        raise ConfigError(f"{spot}: field 'filter' must be an object with "
                          f"{' and/or '.join(_FILTER_FIELDS)}")
    _unknown(raw, _FILTER_FIELDS, f"{spot}: filter")
    for name, value in raw.items():
        if not isinstance(value, str):
            raise ConfigError(f"{spot}: filter: field {name!r} must be a string")
    return raw


def _parse_headers(raw, spot):
    if not isinstance(raw, dict):
        raise ConfigError(f"{spot}: field 'headers' must be an object of header names to "
                          "values")
    for name, value in raw.items():
        if not _TOKEN.fullmatch(name):
            raise ConfigError(f"{spot}: headers: {name!r} is not a header name")
        if name.lower() in RESERVED_HEADERS:
            raise ConfigError(f"{spot}: headers: {name!r} is set by BunPulse itself (it may "
                              "not be replaced: the receiver checks it)")
        if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
            raise ConfigError(f"{spot}: headers: the value of {name!r} must be a string on "
                              "one line")
    return tuple(raw.items())


def _parse_keys(raw, where):
    """`keys`: [{"key", "secret"}, ...], the pairs active beside (or, without a top-level
    key/secret, as) the app's primary pair."""
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: field 'keys' must be a list of {{\"key\", \"secret\"}} "
                          "objects")
    pairs = []
    for n, entry in enumerate(raw):
        spot = f"{where}: keys[{n}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{spot}: each pair must be a JSON object with a 'key' and a "
                              "'secret'")
        _unknown(entry, ("key", "secret"), spot)
        for name in ("key", "secret"):
            if not isinstance(entry.get(name), str) or not entry[name]:
                raise ConfigError(f"{spot}: field {name!r} must be a non-empty string")
        pairs.append(KeyPair(entry["key"], entry["secret"]))
    return tuple(pairs)


def _with_primary(values, where):
    """The top-level key/secret is the primary pair; without it, the first of `keys` is."""
    extra = values.pop("keys", ())
    if ("key" in values) != ("secret" in values):
        missing = "secret" if "key" in values else "key"
        raise ConfigError(f"{where}: field {missing!r} is missing")
    if "key" not in values:
        if not extra:
            raise ConfigError(f"{where}: field 'key' is missing (or give 'keys')")
        values["key"], values["secret"] = extra[0].key, extra[0].secret
        extra = extra[1:]
    seen = {values["key"]}
    for pair in extra:
        if pair.key in seen:
            raise ConfigError(f"{where}: the key {pair.key!r} is given twice")
        seen.add(pair.key)
    values["keys"] = extra
    return values


def _parse_origins(raw, where):
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: field 'allowed_origins' must be a non-empty list of "
                          "origins (https://app.example.com), hosts (*.example.com) or \"*\"")
    try:
        return AllowedOrigins(raw)
    except ValueError as exc:
        raise ConfigError(f"{where}: field 'allowed_origins': {exc}") from None


def parse_app(raw, where):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: each app must be a JSON object")
    values = {}
    _unknown(raw, tuple(_FIELDS), where)
    for name, value in raw.items():
        field = _FIELDS[name]
        if name == "webhooks":
            value = _parse_webhooks(value, where)
        elif name == "allowed_origins":
            value = _parse_origins(value, where)
        elif name == "keys":
            value = _parse_keys(value, where)
        elif name == "id":
            if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
                raise ConfigError(f"{where}: field 'id' must be a non-empty string or number")
            value = str(value)
        elif field.type == "str" or field.type is str:
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{where}: field {name!r} must be a non-empty string")
        elif field.type == "bool" or field.type is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: field {name!r} must be true or false")
        elif isinstance(value, bool) or not isinstance(value, int) or \
                value < (name in _AT_LEAST_ONE):
            raise ConfigError(f"{where}: field {name!r} must be a whole number of at least "
                              f"{int(name in _AT_LEAST_ONE)}")
        values[name] = value
    if "id" not in values:
        raise ConfigError(f"{where}: field 'id' is missing")
    return App(**_with_primary(values, where))


def _no_repeated_fields(pairs):
    # json keeps the last of two equal fields: a repeated "secret" would pass unseen.
    names = [name for name, _ in pairs]
    for name in names:
        if names.count(name) > 1:
            owner = dict(pairs).get("id")
            where = "" if owner is None or isinstance(owner, (dict, list)) else f"app {owner}: "
            raise ConfigError(f"{where}field {name!r} is given twice")
    return dict(pairs)


def load_apps_file(path, taken=()):
    """The apps of a JSON file; `taken` are the apps already configured (the environment's),
    whose id and key no app of the file may reuse."""
    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle, object_pairs_hook=_no_repeated_fields)
    except OSError as exc:
        raise ConfigError(f"--apps-file {path}: cannot read it ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--apps-file {path}: invalid JSON at line {exc.lineno}: {exc.msg}") \
            from None
    except UnicodeDecodeError as exc:  # before json.JSONDecodeError's parent ValueError
        raise ConfigError(f"--apps-file {path}: not UTF-8 (byte {exc.start})") from None
    except ConfigError as exc:
        raise ConfigError(f"--apps-file {path}: {exc}") from None
    if isinstance(raw, dict) and "apps" in raw:
        raw = raw["apps"]
    return parse_apps(raw, f"--apps-file {path}", taken)


def parse_apps(raw, source, taken=()):
    """The apps of a list of app records (an apps file's, or one about to be written), checked
    as at start-up; `source` begins every error message."""
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: expected a JSON list of apps")
    apps = []
    owners = {named: f"app {app.id} of PUSHER_APP_ID" for app in taken for named in _names(app)}
    for n, entry in enumerate(raw):
        label = entry.get("id", n) if isinstance(entry, dict) else n
        where = f"{source}: app {label}"
        app = parse_app(entry, where)
        for field, value in _names(app):
            if (field, value) in owners:
                raise ConfigError(f"{where}: field {field!r} {value!r} is already used by "
                                  f"{owners[field, value]}")
            owners[field, value] = f"app {app.id}"
        apps.append(app)
    return apps


def _names(app):
    """What no two apps may share: the id and every key."""
    return [("id", app.id)] + [("key", pair.key) for pair in app.pairs]


def environment_apps(settings):
    """The app of PUSHER_APP_* (with its options), or none: a list."""
    if not settings.app_id:
        return []
    return [App(id=settings.app_id, key=settings.app_key, secret=settings.app_secret,
                keys=tuple(KeyPair(*pair) for pair in settings.app_keys or ()),
                **_environment_options(settings))]


def _environment_options(settings):
    """What the options set of the environment's app (or the development app)."""
    return dict(client_events=settings.client_events,
                max_connections=settings.max_connections,
                allowed_origins=settings.allowed_origins or ANY,
                max_presence_member_size_in_kb=settings.max_presence_member_size_in_kb,
                max_backend_events_per_second=settings.max_backend_events_per_second,
                max_read_requests_per_second=settings.max_read_requests_per_second,
                subscription_count=settings.subscription_count,
                webhooks=_targets(settings))


def load_apps(settings):
    """The apps of a deployment: the environment's app, the apps file's, or the dev app."""
    apps = environment_apps(settings)
    if settings.apps_file:
        apps.extend(load_apps_file(settings.apps_file, taken=apps))
    if not apps:
        apps.append(App(**_environment_options(settings), **DEV_APP))
    return AppRegistry(apps)

"""bunpulse.signatures with no server: the test vectors of pusher-protocol.md and every way a
signature can be wrong."""
import hashlib
import json

import pytest

from bunpulse import signatures
from bunpulse.api_query import NonCanonicalQuery, parse_query
from bunpulse.apps import App
from bunpulse.errors import ApiError

# The key and secret of Pusher's documented test vectors.
APP = App(id="3", key="278d425bdf160c739803", secret="7ad3773142a6692b25b8")
PRIVATE_SIG = "58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
USER_SIG = "4708d583dada6a56435fb8bc611c77c359a31eebde13337c16ab43aa6de336ba"
BODY = b'{"name":"foo","channels":["project-3"],"data":"{\\"some\\":\\"data\\"}"}'
BODY_MD5 = "ec365a775a4cd0599faeb73354201b6f"
TIMESTAMP = 1353088179
API_SIG = "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"


def params(**extra):
    values = {"auth_key": APP.key, "auth_timestamp": str(TIMESTAMP), "auth_version": "1.0",
              "body_md5": BODY_MD5, "auth_signature": API_SIG}
    values.update(extra)
    return {k: v for k, v in values.items() if v is not None}


# ---------------------------------------------------------------- channel and user auth

def test_private_channel_vector():
    assert signatures.sign(APP.secret, "1234.1234:private-foobar") == PRIVATE_SIG
    assert signatures.channel_auth(APP, "1234.1234", "private-foobar") == \
        f"{APP.key}:{PRIVATE_SIG}"
    assert signatures.channel_auth_ok(APP, "1234.1234", "private-foobar",
                                      f"{APP.key}:{PRIVATE_SIG}")


def test_user_auth_vector():
    user_data = '{"id":"12345"}'
    assert signatures.sign(APP.secret, f"1234.1234::user::{user_data}") == USER_SIG
    assert signatures.user_auth(APP, "1234.1234", user_data) == f"{APP.key}:{USER_SIG}"
    assert signatures.user_auth_ok(APP, "1234.1234", user_data, f"{APP.key}:{USER_SIG}")
    assert not signatures.user_auth_ok(APP, "1234.1234", '{"id": "12345"}',
                                       f"{APP.key}:{USER_SIG}")
    assert not signatures.user_auth_ok(APP, "1234.1235", user_data, f"{APP.key}:{USER_SIG}")


@pytest.mark.parametrize("auth", [
    f"{APP.key}:{PRIVATE_SIG[:-1]}0",            # one hex digit off
    f"{APP.key}:{PRIVATE_SIG.upper()}",
    f"wrong-key:{PRIVATE_SIG}",                   # right signature, wrong key
    PRIVATE_SIG,                                  # no key part
    f"{APP.key}:", "", ":", None, 5, {"auth": 1},
])
def test_wrong_private_auth(auth):
    assert not signatures.channel_auth_ok(APP, "1234.1234", "private-foobar", auth)


def test_private_auth_is_bound_to_socket_and_channel():
    auth = f"{APP.key}:{PRIVATE_SIG}"
    assert not signatures.channel_auth_ok(APP, "1234.1235", "private-foobar", auth)
    assert not signatures.channel_auth_ok(APP, "1234.1234", "private-foobaz", auth)


def test_presence_auth_signs_channel_data_exactly_as_received():
    channel_data = '{"user_id":"1","user_info":{"name":"a"}}'
    auth = signatures.channel_auth(APP, "1.2", "presence-x", channel_data)
    expected = signatures.sign(APP.secret, f"1.2:presence-x:{channel_data}")
    assert auth == f"{APP.key}:{expected}"
    assert signatures.channel_auth_ok(APP, "1.2", "presence-x", auth, channel_data)
    # The same member re-serialized with spaces is another string: refused.
    reserialized = json.dumps(json.loads(channel_data))
    assert reserialized != channel_data
    assert not signatures.channel_auth_ok(APP, "1.2", "presence-x", auth, reserialized)
    # A presence signature is not a private one.
    assert not signatures.channel_auth_ok(APP, "1.2", "presence-x", auth)


# ---------------------------------------------------------------- HTTP API

def test_api_worked_example():
    assert hashlib.md5(BODY).hexdigest() == BODY_MD5
    string = signatures.api_string_to_sign("POST", "/apps/3/events", params())
    assert string == ("POST\n/apps/3/events\nauth_key=278d425bdf160c739803&auth_timestamp="
                      f"{TIMESTAMP}&auth_version=1.0&body_md5={BODY_MD5}")
    assert signatures.sign_api_request(APP.secret, "POST", "/apps/3/events", params()) == API_SIG
    signatures.verify_api_request(APP, "POST", "/apps/3/events", params(), BODY, now=TIMESTAMP)


def test_api_query_is_sorted_lower_cased_and_not_escaped():
    query = {"Z": "1", "a": "x y,z", "auth_signature": "ignored"}
    assert signatures.api_string_to_sign("get", "/p", query) == "GET\n/p\na=x y,z&z=1"


def test_api_accepts_600_seconds_of_skew():
    for now in (TIMESTAMP + 600, TIMESTAMP - 600):
        signatures.verify_api_request(APP, "POST", "/apps/3/events", params(), BODY, now=now)


def expect_401(query, body=BODY, now=TIMESTAMP, method="POST", path="/apps/3/events"):
    with pytest.raises(ApiError) as info:
        signatures.verify_api_request(APP, method, path, query, body, now=now)
    assert info.value.status == 401
    assert API_SIG not in info.value.message
    expected = signatures.sign_api_request(APP.secret, method, path, query)
    assert expected not in info.value.message
    return info.value.message


def test_api_expired_timestamp():
    assert "Timestamp" in expect_401(params(), now=TIMESTAMP + 601)
    assert "Timestamp" in expect_401(params(), now=TIMESTAMP - 601)


@pytest.mark.parametrize("query", [
    params(auth_signature=API_SIG[:-1] + "0"),
    params(auth_signature=None),
    params(auth_key="other-key"),
    params(auth_key=None),
    params(auth_timestamp="soon"),
    params(auth_timestamp=None),
    params(auth_version="2.0"),
    params(extra="1"),                    # a parameter that was not signed
])
def test_api_bad_signatures(query):
    expect_401(query)


def test_api_signature_covers_method_and_path():
    expect_401(params(), method="PUT")
    expect_401(params(), path="/apps/4/events")


def test_api_body_md5_mismatch():
    other = BODY.replace(b"foo", b"bar")
    assert "body_md5" in expect_401(params(), body=other)


def test_api_body_without_body_md5():
    query = params(body_md5=None)
    query["auth_signature"] = signatures.sign_api_request(APP.secret, "POST", "/apps/3/events",
                                                          query)
    assert "body_md5" in expect_401(query)


def test_api_get_with_empty_body_md5_is_accepted():
    # The PyPI library sends body_md5 of an empty body on GET.
    query = params(body_md5=hashlib.md5(b"").hexdigest())
    query["auth_signature"] = signatures.sign_api_request(APP.secret, "GET", "/apps/3/channels",
                                                          query)
    signatures.verify_api_request(APP, "GET", "/apps/3/channels", query, b"", now=TIMESTAMP)
    query = params(body_md5=None)
    query["auth_signature"] = signatures.sign_api_request(APP.secret, "GET", "/apps/3/channels",
                                                          query)
    signatures.verify_api_request(APP, "GET", "/apps/3/channels", query, b"", now=TIMESTAMP)


def test_bearer_token_is_the_secret_never_the_key():
    assert signatures.bearer_ok(APP, f"Bearer {APP.secret}")
    assert not signatures.bearer_ok(APP, f"Bearer {APP.key}")
    assert not signatures.bearer_ok(APP, f"Bearer {APP.secret}x")
    assert not signatures.bearer_ok(APP, APP.secret)
    assert not signatures.bearer_ok(APP, f"Basic {APP.secret}")
    assert not signatures.bearer_ok(APP, None)
    assert not signatures.bearer_ok(APP, "Bearer ")


# ---------------------------------------------------------------- webhooks

def test_webhook_signature_is_accepted_by_the_pypi_validator():
    import time

    import pusher
    body = json.dumps({"time_ms": int(time.time() * 1000),
                       "events": [{"name": "channel_vacated", "channel": "a"}]})
    client = pusher.Pusher(app_id=APP.id, key=APP.key, secret=APP.secret)
    signature = signatures.webhook_signature(APP.secret, body.encode())
    assert client.validate_webhook(APP.key, signature, body)["events"] == [
        {"name": "channel_vacated", "channel": "a"}]
    assert client.validate_webhook(APP.key, signature, body.replace('"a"', '"b"')) is None


# ---------------------------------------------------------------- the canonical query (issue 21, 6)

def test_the_official_libraries_queries_are_canonical():
    """What the PyPI library sends (its own make_query_string) and the npm library's shape
    (info with a comma, a prefix with '-'), parsed as sent and signed as they sign them."""
    import pusher
    client = pusher.pusher_client.PusherClient(app_id="3", key=APP.key, secret=APP.secret)
    request = pusher.http.Request(client, "GET", "/apps/3/channels",
                                  {"filter_by_prefix": "presence-", "info": "user_count"})
    params = parse_query(request.query_string)
    assert params == request.query_params
    assert signatures.sign_api_request(APP.secret, "GET", "/apps/3/channels", params) == \
        params["auth_signature"]
    npm_shape = ("auth_key=k&auth_timestamp=1&auth_version=1.0&info=user_count,"
                 "subscription_count&filter_by_prefix=private-a=b@c&auth_signature=s")
    assert parse_query(npm_shape)["filter_by_prefix"] == "private-a=b@c"
    assert parse_query("info=user_count%2Csubscription_count&x=a+b") == {
        "info": "user_count,subscription_count", "x": "a b"}  # requests' and forms' escapes


@pytest.mark.parametrize("query, why", [
    ("FILTER_BY_PREFIX=presence-", "lower-case"),
    ("auth_key=k&Auth_Key=k", "lower-case"),
    ("info=user_count&info=subscription_count", "more than once"),
    ("filter_by_prefix%3Dpresence-%26info=user_count", "plain"),
    ("filter%5Fby%5Fprefix=presence-", "plain"),
    ("a+b=1", "plain"),
    ("=1", "plain"),
    ("filter_by_prefix=presence-%26info%3Duser_count", "'&'"),
])
def test_non_canonical_queries_are_refused(query, why):
    with pytest.raises(NonCanonicalQuery) as info:
        parse_query(query)
    assert why in str(info.value)

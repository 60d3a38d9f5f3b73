"""bunpulse.protocol with no server: name rules, channel kinds, presence and signin data, and
the exact shape of every frame (pusher-protocol.md sections 1 to 6)."""
import json
import subprocess
import sys

import pytest

from bunpulse import protocol
from bunpulse.errors import ClientError
from conftest import ROOT

ALLOWED = "AZaz09_-=@,.;"


# ---------------------------------------------------------------- channel names

@pytest.mark.parametrize("name", [
    "a", "my-channel", "private-foo", "presence-room-1", ALLOWED, "x" * 200,
    "private-encrypted-cache-a_b=c@d,e.f;g", "#server-to-user-42", "#server-to-user-a.b@c",
])
def test_valid_channel_names(name):
    assert protocol.valid_channel_name(name)


@pytest.mark.parametrize("name", [
    "", "x" * 201, "has space", "slash/no", "colon:no", "star*", "plus+", "é", "tab\t",
    "#", "#general", "a#b", "#server-to-user-", "#server-to-user-a b", "#server-to-user-#",
    "#server-to-user-" + "u" * 185, "a\n", "#server-to-user-1\n", "١٢", None, 5, ["a"],
])
def test_invalid_channel_names(name):
    assert not protocol.valid_channel_name(name)


def test_channel_name_length_counts_the_user_prefix():
    prefix = protocol.USER_CHANNEL_PREFIX
    assert protocol.valid_channel_name(prefix + "u" * (200 - len(prefix)))
    assert not protocol.valid_channel_name(prefix + "u" * (201 - len(prefix)))


def test_channel_name_limit_is_per_app():
    assert protocol.valid_channel_name("x" * 10, max_length=10)
    assert not protocol.valid_channel_name("x" * 11, max_length=10)


# ---------------------------------------------------------------- channel kinds

KINDS = {  # name: (private, presence, encrypted, cache, user, client events allowed)
    "my-channel": (False, False, False, False, False, False),
    "privatechannel": (False, False, False, False, False, False),
    "presencex": (False, False, False, False, False, False),
    "private-a": (True, False, False, False, False, True),
    "private-encrypted-a": (True, False, True, False, False, False),
    "presence-a": (True, True, False, False, False, True),
    "cache-a": (False, False, False, True, False, False),
    "private-cache-a": (True, False, False, True, False, True),
    "private-encrypted-cache-a": (True, False, True, True, False, False),
    "presence-cache-a": (True, True, False, True, False, True),
    "#server-to-user-1": (False, False, False, False, True, False),
}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_channel_kinds(name):
    kind = protocol.channel_kind(name)
    assert (kind.private, kind.presence, kind.encrypted, kind.cache, kind.user,
            kind.client_events_allowed) == KINDS[name]


# ---------------------------------------------------------------- presence channel_data

def test_presence_data_string_user_id():
    assert protocol.parse_presence_data('{"user_id":"1","user_info":{"name":"a"}}') == \
        ("1", {"name": "a"})


def test_presence_data_without_user_info():
    assert protocol.parse_presence_data('{"user_id":"1"}') == ("1", None)


def test_numeric_user_id_is_keyed_as_a_string():
    assert protocol.parse_presence_data('{"user_id":42,"user_info":{}}') == ("42", {})
    assert protocol.parse_presence_data('{"user_id":0}')[0] == "0"


def test_user_id_limit_is_128_characters():
    assert protocol.parse_presence_data(json.dumps({"user_id": "u" * 128}))[0] == "u" * 128
    with pytest.raises(ValueError, match="128"):
        protocol.parse_presence_data(json.dumps({"user_id": "u" * 129}))


def test_user_info_limit_is_1_kb():
    def channel_data(size):
        info = {"n": ""}
        info["n"] = "x" * (size - len(json.dumps(info, separators=(",", ":"))))
        assert len(json.dumps(info, separators=(",", ":"))) == size
        return json.dumps({"user_id": "1", "user_info": info})

    assert protocol.parse_presence_data(channel_data(1024))[0] == "1"
    with pytest.raises(ValueError, match="1024"):
        protocol.parse_presence_data(channel_data(1025))


@pytest.mark.parametrize("channel_data", [
    None, {"user_id": "1"}, "not json", "[1]", '"1"', "{}", '{"user_info":{}}',
    '{"user_id":""}', '{"user_id":null}', '{"user_id":true}', '{"user_id":["1"]}',
    '{"user_id":{"a":1}}',
])
def test_invalid_presence_data(channel_data):
    with pytest.raises(ValueError):
        protocol.parse_presence_data(channel_data)


# ---------------------------------------------------------------- signin user_data

def test_user_data():
    user = protocol.parse_user_data('{"id":"1","user_info":{"a":1},"watchlist":["2","3"]}')
    assert user == {"id": "1", "user_info": {"a": 1}, "watchlist": ["2", "3"]}


@pytest.mark.parametrize("user_data", [
    None, {"id": "1"}, "nope", "[]", "{}", '{"id":""}', '{"id":1}', json.dumps({"id": "u" * 129}),
    '{"id":"1","watchlist":"2"}', '{"id":"1","watchlist":[2]}',
])
def test_invalid_user_data(user_data):
    with pytest.raises(ValueError):
        protocol.parse_user_data(user_data)


# ---------------------------------------------------------------- client frames

def test_parse_pusher_js_frames():
    frame = protocol.parse_client_frame(
        '{"event":"pusher:subscribe","data":{"auth":"k:s","channel":"private-1"}}')
    assert (frame.event, frame.data, frame.channel) == (
        "pusher:subscribe", {"auth": "k:s", "channel": "private-1"}, None)
    frame = protocol.parse_client_frame(
        '{"event":"client-typing","channel":"presence-1","data":{"b":2}}')
    assert (frame.event, frame.data, frame.channel) == ("client-typing", {"b": 2}, "presence-1")


def test_double_encoded_pusher_data_is_accepted():
    frame = protocol.parse_client_frame(
        json.dumps({"event": "pusher:subscribe", "data": json.dumps({"channel": "a"})}))
    assert frame.data == {"channel": "a"}


def test_client_event_string_data_is_kept_as_a_string():
    frame = protocol.parse_client_frame('{"event":"client-x","channel":"private-a","data":"{}"}')
    assert frame.data == "{}"


@pytest.mark.parametrize("text", [
    "not json", "", "[1,2]", '"event"', "null", "{}", '{"data":{}}', '{"event":5}',
    '{"event":""}', '{"event":null}', '{"event":"client-x","channel":5}',
])
def test_malformed_client_frames(text):
    with pytest.raises(ClientError) as info:
        protocol.parse_client_frame(text)
    assert info.value.message


# ---------------------------------------------------------------- server frames

def decode(frame):
    assert isinstance(frame, bytes)
    return json.loads(frame)


def test_connection_established_is_double_encoded():
    frame = decode(protocol.connection_established("123.456", 120))
    assert frame == {"event": "pusher:connection_established",
                     "data": '{"socket_id":"123.456","activity_timeout":120}'}


def test_error_data_is_an_object():
    assert decode(protocol.error(4001, "App key foo does not exist.")) == {
        "event": "pusher:error", "data": {"code": 4001, "message": "App key foo does not exist."}}
    assert decode(protocol.error(None, "bad"))["data"] == {"code": None, "message": "bad"}


def test_event_forwards_string_data_byte_for_byte():
    data = '{"message": "héllo \\u00e9",  "n":1}'
    frame = decode(protocol.event("my-event", "my-channel", data))
    assert frame == {"event": "my-event", "channel": "my-channel", "data": data}


def test_event_with_user_id():
    frame = decode(protocol.event("client-typing", "presence-1", {"b": 2}, "9"))
    assert frame == {"event": "client-typing", "channel": "presence-1", "data": {"b": 2},
                     "user_id": "9"}


def test_data_string():
    assert protocol.data_string("already a string") == "already a string"
    assert json.loads(protocol.data_string({"a": [1, "é"]})) == {"a": [1, "é"]}


def test_subscription_succeeded():
    assert decode(protocol.subscription_succeeded("my-channel")) == {
        "event": "pusher_internal:subscription_succeeded", "channel": "my-channel", "data": "{}"}
    roster = protocol.presence_roster({"1": {"name": "a"}, "2": None})
    frame = decode(protocol.subscription_succeeded("presence-x", roster))
    assert isinstance(frame["data"], str)
    assert json.loads(frame["data"]) == {"presence": {
        "ids": ["1", "2"], "hash": {"1": {"name": "a"}, "2": None}, "count": 2}}


def test_empty_presence_roster_still_has_the_presence_object():
    frame = decode(protocol.subscription_succeeded("presence-x", protocol.presence_roster({})))
    assert json.loads(frame["data"]) == {"presence": {"ids": [], "hash": {}, "count": 0}}


def test_subscription_error_is_channel_scoped():
    assert decode(protocol.subscription_error("private-x", "Invalid signature")) == {
        "event": "pusher:subscription_error", "channel": "private-x",
        "data": {"type": "AuthError", "error": "Invalid signature", "status": 401}}


def test_member_frames_are_double_encoded():
    added = decode(protocol.member_added("presence-x", "1", {"name": "a"}))
    assert added["event"] == "pusher_internal:member_added" and added["channel"] == "presence-x"
    assert json.loads(added["data"]) == {"user_id": "1", "user_info": {"name": "a"}}
    removed = decode(protocol.member_removed("presence-x", "1"))
    assert removed == {"event": "pusher_internal:member_removed", "channel": "presence-x",
                       "data": '{"user_id":"1"}'}


def test_ping_pong_and_misc_frames():
    assert decode(protocol.PING) == {"event": "pusher:ping", "data": "{}"}
    assert decode(protocol.PONG) == {"event": "pusher:pong", "data": "{}"}
    assert decode(protocol.cache_miss("cache-x")) == {"event": "pusher:cache_miss",
                                                      "channel": "cache-x"}
    assert decode(protocol.signin_success('{"id":"1"}')) == {
        "event": "pusher:signin_success", "data": {"user_data": '{"id":"1"}'}}
    assert decode(protocol.watchlist_events([("online", ["2"]), ("offline", ["3"])])) == {
        "event": "pusher_internal:watchlist_events", "data": {"events": [
            {"name": "online", "user_ids": ["2"]}, {"name": "offline", "user_ids": ["3"]}]}}


def test_socket_id_pattern():
    assert protocol.SOCKET_ID_RE.match("123.456")
    for bad in ("123", "1.2.3", "a.1", "1.", ".1", "1.2\n", "١.٢", " 1.2"):
        assert not protocol.SOCKET_ID_RE.match(bad), bad


# ---------------------------------------------------------------- purity

def test_protocol_and_signatures_import_no_io_libraries():
    code = ("import sys, bunpulse.protocol, bunpulse.signatures; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('gevent', 'geventwebsocket', 'flask', 'werkzeug', 'redis', 'requests', 'greenlet'));"
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr

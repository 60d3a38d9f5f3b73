"""End-to-end encrypted channels (protocol reference, section 3): authorized like private
channels, the payload made by the publisher is relayed untouched, only clients decrypt it."""
import base64
import hashlib
import json

import nacl.secret

from conftest import KEY, MASTER_KEY, connected, pusher_api, raw_subscribe

CHANNEL = "private-encrypted-x"


def decrypt(channel, data):
    """What pusher-js does with {nonce, ciphertext}, using the key derived from the master key."""
    payload = json.loads(data)
    assert set(payload) == {"nonce", "ciphertext"}
    key = hashlib.sha256(channel.encode() + base64.b64decode(MASTER_KEY)).digest()
    return json.loads(nacl.secret.SecretBox(key).decrypt(
        base64.b64decode(payload["ciphertext"]), base64.b64decode(payload["nonce"])))


def raw_encrypted_subscriber(raw, channel=CHANNEL):
    client = raw()
    raw_subscribe(client, connected(client), channel)
    assert client.recv_event("pusher_internal:subscription_succeeded")["channel"] == channel
    return client


def test_pusher_js_decrypts_what_the_npm_library_encrypts(node, raw):
    node.connect("a")
    node.subscribe("a", CHANNEL)
    watcher = raw_encrypted_subscriber(raw)
    reply = node.call("api", method="trigger", args=[CHANNEL, "secret", {"msg": "hi", "n": 1}])
    assert reply["ok"], reply
    assert node.wait_event("a", "secret", CHANNEL)["data"] == {"msg": "hi", "n": 1}
    # The server relays the ciphertext, never the plaintext.
    frame = watcher.recv_event("secret")
    # (not `"hi" not in data`: base64 ciphertext holds "hi" by chance a few times in a hundred)
    assert isinstance(frame["data"], str) and set(json.loads(frame["data"])) == {
        "nonce", "ciphertext"} and '"msg"' not in frame["data"]
    assert decrypt(CHANNEL, frame["data"]) == {"msg": "hi", "n": 1}


def test_payload_is_relayed_byte_for_byte(server, node, raw):
    # The PyPI library serializes {nonce, ciphertext} with json.dumps spacing; a server that
    # re-encoded it would lose the spaces.
    api = pusher_api(server, encryption_master_key_base64=MASTER_KEY)
    node.connect("a")
    node.subscribe("a", CHANNEL)
    watcher = raw_encrypted_subscriber(raw)
    api.trigger(CHANNEL, "from-python", {"msg": "bonjour"})
    data = watcher.recv_event("from-python")["data"]
    assert data == json.dumps(json.loads(data), ensure_ascii=False)
    assert data.startswith('{"nonce": "')
    assert decrypt(CHANNEL, data) == {"msg": "bonjour"}
    assert node.wait_event("a", "from-python", CHANNEL)["data"] == {"msg": "bonjour"}


def test_encrypted_channel_needs_a_valid_signature(raw):
    client = raw()
    socket_id = connected(client)
    raw_subscribe(client, socket_id, CHANNEL, secret="wrong-secret")
    error = client.recv_event("pusher:subscription_error")
    assert error["channel"] == CHANNEL and error["data"]["status"] == 401
    # Signed for another channel: refused too.
    client.send({"event": "pusher:subscribe", "data": {
        "channel": "private-encrypted-y",
        "auth": KEY + ":" + "0" * 64}})
    assert client.recv_event("pusher:subscription_error")["channel"] == "private-encrypted-y"


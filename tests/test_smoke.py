"""The shortest path through the product: pusher-js receives what the PyPI library triggers."""

from conftest import assert_alive, connected


def test_public_event_reaches_pusher_js(node, api):
    node.connect("a")
    node.subscribe("a", "my-channel")
    api.trigger("my-channel", "my-event", {"message": "hello world"})
    event = node.wait_event("a", "my-event", "my-channel")
    assert event["data"] == {"message": "hello world"}


def test_raw_connection_established(raw):
    client = raw()
    socket_id = connected(client)
    assert socket_id.count(".") == 1 and socket_id.replace(".", "").isdigit()
    assert_alive(client)

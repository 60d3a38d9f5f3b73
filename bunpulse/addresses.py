"""The client address of a request: the peer, or, behind trusted proxies only, the address they
forwarded (X-Forwarded-For, else Forwarded). Headers from anyone else are ignored: a client
could name any address in them."""
import ipaddress


class TrustedProxies:
    """Parsed `--trust-proxy`: comma-separated addresses or networks, or `all`."""

    def __init__(self, spec=None):
        text = (spec or "").strip()
        self.all = text.lower() in ("all", "*")
        self.networks = () if self.all or not text else tuple(
            ipaddress.ip_network(part.strip(), strict=False)
            for part in text.split(",") if part.strip())

    def __bool__(self):
        return self.all or bool(self.networks)

    def trusts(self, address):
        if self.all:
            return True
        ip = _ip(address)
        return ip is not None and any(ip in network for network in self.networks)


def parse_trusted(value):
    """config.py's check of --trust-proxy: the text itself, or ValueError."""
    if value in (None, ""):
        return None
    try:
        TrustedProxies(value)
    except ValueError:
        raise ValueError("must be 'all' or comma-separated IP addresses or networks") from None
    return str(value)


parse_trusted.metavar = "ADDRESSES"


def client_address(environ, trusted):
    """The address to count a connection against; `trusted` is a TrustedProxies."""
    peer = environ.get("REMOTE_ADDR") or ""  # empty on a unix socket
    if not trusted or not trusted.trusts(peer):
        return peer
    hops = _forwarded_for(environ)
    # The nearest hop that is not one of our proxies is the client; proxies append on the right.
    for hop in reversed(hops):
        if not trusted.trusts(hop):
            return hop
    return hops[0] if hops else peer


def _forwarded_for(environ):
    header = environ.get("HTTP_X_FORWARDED_FOR")
    if header:
        return [hop.strip() for hop in header.split(",") if hop.strip()]
    header = environ.get("HTTP_FORWARDED")
    if not header:
        return []
    hops = []
    for element in header.split(","):
        for pair in element.split(";"):
            name, _, value = pair.strip().partition("=")
            if name.lower() == "for" and value:
                hops.append(_strip_node(value.strip().strip('"')))
    return hops


def _strip_node(node):
    """RFC 7239 node: `[v6]:port`, `v4:port` or an obfuscated name, reduced to the address."""
    if node.startswith("["):
        return node[1:node.find("]")] if "]" in node else node
    if node.count(":") == 1:
        return node.partition(":")[0]
    return node


def _ip(text):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None

"""The client address of a request: the peer, or, behind trusted proxies only, the address they
forwarded (X-Forwarded-For, else Forwarded). Headers from anyone else are ignored: a client
could name any address in them. And what the per-address limit counts: an IPv4 address, or an
IPv6 network (one subscriber holds a whole /64, and a new address of it per connection)."""
import ipaddress

ALL_REFUSED = ("'all' is no longer accepted: it believed every hop, so a client's own "
               "X-Forwarded-For chose the address it is counted as; give the number of proxies "
               "in front of BunPulse (1 for one nginx or Caddy, also on a unix socket)")


class TrustedProxies:
    """Parsed `--trust-proxy`: the number of proxies in front of BunPulse, each appending the
    address it saw to X-Forwarded-For (the client is that many hops from the right, whatever
    the peer), or comma-separated addresses or networks of the proxies (the client is the
    nearest hop that is not one of them, from a peer that is)."""

    def __init__(self, spec=None):
        text = (spec or "").strip()
        if text.lower() in ("all", "*"):
            raise ValueError(ALL_REFUSED)
        self.hops = int(text) if text.isdigit() else 0
        self.networks = () if self.hops or not text else tuple(
            ipaddress.ip_network(part.strip(), strict=False)
            for part in text.split(",") if part.strip())

    def __bool__(self):
        return bool(self.hops or self.networks)

    def trusts(self, address):
        """Whether the peer `address` is one of our proxies ("" on a unix socket)."""
        if self.hops:
            return True
        ip = _ip(address)
        return ip is not None and any(ip in network for network in self.networks)


def parse_trusted(value):
    """config.py's check of --trust-proxy: the text itself, or ValueError."""
    if value in (None, ""):
        return None
    try:
        TrustedProxies(value)
    except ValueError as exc:
        if str(exc) == ALL_REFUSED:
            raise
        raise ValueError("must be a number of proxies, or comma-separated IP addresses or "
                         "networks") from None
    return str(value)


parse_trusted.metavar = "N|ADDRESSES"


def client_address(environ, trusted):
    """The address to count a connection against; `trusted` is a TrustedProxies."""
    peer = environ.get("REMOTE_ADDR") or ""  # empty on a unix socket
    if not trusted or not trusted.trusts(peer):
        return peer
    hops = _forwarded_for(environ)
    if trusted.hops:
        # Our proxies appended the last `hops` entries; anything left of them is the client's.
        return hops[-trusted.hops] if len(hops) >= trusted.hops else peer
    # The nearest hop that is not one of our proxies is the client; proxies append on the right.
    for hop in reversed(hops):
        if not trusted.trusts(hop):
            return hop
    return hops[0] if hops else peer


def counted_as(address, ipv6_prefix=64):
    """What the per-address limit counts `address` as: an IPv4 address (also when written as
    an IPv4-mapped IPv6 one, as a dual-stack socket gives it), or the IPv6 network of
    `ipv6_prefix` bits around it; anything else (a unix socket's "") as it is."""
    ip = _ip(address)
    if ip is None:
        return address
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if ipv6_prefix < 128:
            return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
    return str(ip)


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

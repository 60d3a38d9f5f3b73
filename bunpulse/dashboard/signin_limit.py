"""How many wrong secrets the dashboard's sign-in takes: token buckets per client address and
for the whole process, so that guessing an app's secret is impractical from one address or
from many. Only failures take a token; a refused attempt is not even compared, so no guess
gets through while limited. The per-address table is bounded: an address unseen for longest
is forgotten first (the overall bucket still counts its failures)."""
import math
import time
from collections import OrderedDict

PER_ADDRESS = (5, 1 / 12)   # failures at once, then one more every 12 s (5 a minute)
OVERALL = (20, 1.0)         # failures at once from all addresses, then one a second
MAX_ADDRESSES = 4096        # addresses remembered at most


class _Bucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, burst, now):
        self.tokens, self.stamp = float(burst), now

    def refill(self, burst, rate, now):
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now

    def wait(self, rate):
        """Seconds until one token is there (0 when it is)."""
        return 0 if self.tokens >= 1 else math.ceil((1 - self.tokens) / rate)


class SignInLimit:
    def __init__(self, per_address=PER_ADDRESS, overall=OVERALL, max_addresses=MAX_ADDRESSES,
                 clock=time.monotonic):
        self.per_address, self.overall = per_address, overall
        self.max_addresses = max_addresses
        self.clock = clock
        self._overall = _Bucket(overall[0], clock())
        self._addresses = OrderedDict()  # address -> _Bucket, least recently seen first

    def retry_after(self, address):
        """Seconds the address must wait before its next attempt; 0: it may try now."""
        now = self.clock()
        self._overall.refill(*self.overall, now)
        waits = [self._overall.wait(self.overall[1])]
        bucket = self._addresses.get(address)
        if bucket is not None:
            bucket.refill(*self.per_address, now)
            waits.append(bucket.wait(self.per_address[1]))
        return max(waits)

    def failed(self, address):
        """A wrong id or secret from the address: one token from its bucket and the overall."""
        now = self.clock()
        self._overall.refill(*self.overall, now)
        self._overall.tokens -= 1
        bucket = self._addresses.pop(address, None)
        if bucket is None:
            bucket = _Bucket(self.per_address[0], now)
            while len(self._addresses) >= self.max_addresses:
                self._addresses.popitem(last=False)
        bucket.refill(*self.per_address, now)
        bucket.tokens -= 1
        self._addresses[address] = bucket  # now the most recently seen

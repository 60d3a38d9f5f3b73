"""A gevent hub in a thread of its own, for a program that gevent does not patch: BunPulse's
core lives there, and the program's other threads hand it work."""
import threading

import gevent
import gevent.event


class HubThread:
    """A daemon thread running a gevent hub until `stop`; `setup` runs in it first."""

    def __init__(self, name="bunpulse", setup=None):
        self._loop = None
        self._stop = None  # an async watcher: it keeps the hub alive until sent
        self._error = None
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(setup, ready), name=name,
                                       daemon=True)
        self.thread.start()
        ready.wait(10)
        if self._error is not None:
            raise self._error

    def _run(self, setup, ready):
        try:
            if setup is not None:
                setup()
            self._loop = gevent.get_hub().loop
            halt = gevent.event.Event()
            self._stop = self._loop.async_()
            self._stop.start(halt.set)
        except Exception as exc:  # noqa: BLE001 - raised in the thread that started this one
            self._error = exc
            return
        finally:
            ready.set()
        halt.wait()
        self._stop.close()

    def spawn(self, func, *args):
        """Run func(*args) in a greenlet of the hub; return at once."""
        self._loop.run_callback_threadsafe(gevent.spawn, func, *args)

    def call(self, func, *args, timeout=30):
        """Run func(*args) in the hub and return its result (or raise its exception); called
        from the hub's own thread, just call it."""
        if threading.current_thread() is self.thread:
            return func(*args)
        done, box = threading.Event(), {}

        def run():
            try:
                box["result"] = func(*args)
            except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = exc
            finally:
                done.set()

        self.spawn(run)
        if not done.wait(timeout):
            raise TimeoutError(f"BunPulse's hub did not answer within {timeout} s")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def stop(self):
        self._stop.send()
        self.thread.join(5)

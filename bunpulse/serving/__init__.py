"""One thin driver per way of running BunPulse: each accepts connections, moves bytes and calls
the core (request.py, handshake.py, websocket.serve_upgraded, context.py).

- embedded.py: `python -m bunpulse` and `start_bunpulse` (pywsgi's server)
- gunicorn_worker.py: BunPulse's gunicorn worker (`bunpulse.worker.PusherWorker`)
- stock_worker.py: gevent-websocket's stock gunicorn worker
- flask_run.py: Werkzeug's threaded server (`flask run`), with hub_thread.py
- loop.py: new connections read by the event loop; where the loop serves, decided once
- handler.py: a connection served in a greenlet
- accept.py: accepting paused at the file-descriptor limit
"""

"""An existing Flask application that adds realtime with BunPulse mounted at /realtime, as the
README shows: authorization through the helper, and publishing from its own code.

Served as `gunicorn -k ... flask_host:app` (or `flask --app flask_host run`) from this folder."""
import os

from flask import Flask, request
from werkzeug.middleware.dispatcher import DispatcherMiddleware

import bunpulse
from bunpulse.authorizer import auth_blueprint

realtime = bunpulse.create_app()
app = Flask(__name__)


def current_user(request):
    """Who is signed in. A real application reads its session; the tests say it in a header."""
    name = request.headers.get("X-User")
    return None if name is None else {"id": name, "user_info": {"name": name.title()}}


def may_join(user, channel):                # the README's rule: who may join which private channel
    if channel.startswith("private-user-"):  # a user's own channel: that user only
        return channel == f"private-user-{user['id']}"
    return True                             # the others: every signed-in user


app.register_blueprint(auth_blueprint(
    realtime, current_user, encryption_master_key=os.environ.get("HOST_ENCRYPTION_MASTER_KEY"),
    allow=may_join))


@app.post("/notify")
def notify():
    """The application's own code publishes, in-process."""
    message = request.get_json()
    bunpulse.publish(realtime, message["channel"], message["event"], message["data"])
    return {"published": message["channel"]}


app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/realtime": realtime})


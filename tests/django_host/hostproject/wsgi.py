"""`gunicorn -k ... hostproject.wsgi:application`: Django, with BunPulse mounted at /realtime."""
import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hostproject.settings")

from django.core.wsgi import get_wsgi_application  # noqa: E402 - after the settings module
from werkzeug.middleware.dispatcher import DispatcherMiddleware  # noqa: E402

from hostproject.realtime import realtime  # noqa: E402

application = DispatcherMiddleware(get_wsgi_application(), {"/realtime": realtime})


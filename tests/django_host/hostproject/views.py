"""pusher-js's authorization endpoints through bunpulse.authorizer, and a view that publishes
in-process."""
import json
import os

from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

import bunpulse
from bunpulse.authorizer import Authorizer, signing_app
from hostproject.realtime import realtime


def may_join(user, channel):
    """docs/running.md's rule: a user's own channel for that user only, the others for all."""
    if channel.startswith("private-user-"):
        return channel == f"private-user-{user['id']}"
    return True


authorizer = Authorizer(signing_app(realtime),
                        encryption_master_key=os.environ.get("HOST_ENCRYPTION_MASTER_KEY"),
                        allow=may_join)


def current_user(request):
    """Who is signed in. A real project reads request.user; the tests say it in a header."""
    name = request.headers.get("X-User")
    return None if name is None else {"id": name, "user_info": {"name": name.title()}}


@csrf_exempt  # pusher-js can send the CSRF token instead: channelAuthorization.headers
@require_POST
def pusher_auth(request):
    status, payload = authorizer.answer(request.POST, current_user(request))
    return JsonResponse(payload, status=status)


@csrf_exempt
@require_POST
def notify(request):
    message = json.loads(request.body)
    bunpulse.publish(realtime, message["channel"], message["event"], message["data"])
    return JsonResponse({"published": message["channel"]})

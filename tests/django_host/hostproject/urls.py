from django.urls import path

from hostproject import views

urlpatterns = [
    path("pusher/auth", views.pusher_auth),
    path("pusher/user-auth", views.pusher_auth),
    path("notify", views.notify),
]

"""BunPulse for this project: the WSGI app that wsgi.py mounts and views.py publishes with."""
import bunpulse

realtime = bunpulse.create_app()

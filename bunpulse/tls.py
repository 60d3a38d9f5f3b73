"""TLS for the public port: wss:// and https:// from one certificate (`--ssl-cert`/`--ssl-key`)."""
import ssl

from .config import ConfigError


def server_context(settings):
    """The server's SSLContext, or None without a certificate; a ConfigError names what is
    wrong with the files (missing, unreadable, key not matching, wrong passphrase)."""
    if not settings.ssl_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.ssl_cert, settings.ssl_key,
                                password=settings.ssl_key_password or _no_passphrase)
    except OSError as exc:  # ssl.SSLError is an OSError
        reason = exc.strerror or getattr(exc, "reason", None) or str(exc)
        raise ConfigError(f"cannot use --ssl-cert={settings.ssl_cert} with --ssl-key="
                          f"{settings.ssl_key}: {reason}") from None
    return context


def _no_passphrase():
    # Without this, OpenSSL would prompt on the terminal for an encrypted key's passphrase.
    raise ConfigError("--ssl-key is encrypted: set --ssl-key-password")

"""``sessions.url``: the URL forms the Redis store accepts, parsed.

* ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS) and
  ``unix://[[user]:password@]/path/to/redis.sock[?db=N]``: one server.
* ``redis+cluster://[[user]:password@]host[:port][,host[:port]...]`` (or
  ``rediss+cluster://``): Redis Cluster, the hosts being startup nodes.
* ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db]``
  (or ``rediss+sentinel://``): the master that the Sentinels (default port 26379) name
  for ``service_name``. The password is the master's; add ``?sentinel_password=...`` if
  the Sentinels want one too.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from ...errors import ConfigError

_SCHEMES = {
    "redis": "single", "rediss": "single", "unix": "single",
    "redis+cluster": "cluster", "rediss+cluster": "cluster",
    "redis+sentinel": "sentinel", "rediss+sentinel": "sentinel",
}


@dataclass(frozen=True)
class RedisURL:
    """A parsed ``sessions.url``. ``kind`` is ``single``, ``cluster`` or ``sentinel``."""

    kind: str
    url: str
    hosts: tuple[tuple[str, int], ...] = ()
    ssl: bool = False
    username: str | None = None
    password: str | None = None
    db: int = 0
    service: str | None = None
    sentinel_password: str | None = None

    @property
    def display(self) -> str:
        """The URL without credentials, for messages and logs."""
        parts = urlsplit(self.url)
        netloc = parts.netloc.rpartition("@")[2]
        return f"{parts.scheme}://{netloc}{parts.path}"


def parse_redis_url(url: str) -> RedisURL:
    """Parse a URL of one of the forms in the module docstring; :class:`ConfigError` if not."""
    parts = urlsplit(url)
    kind = _SCHEMES.get(parts.scheme)
    if kind is None:
        raise ConfigError(
            f"sessions.url {RedisURL('single', url).display!r} is not allowed: the scheme "
            f"must be one of {', '.join(_SCHEMES)}")
    if kind == "single":
        return RedisURL("single", url, ssl=parts.scheme == "rediss")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, password = None, None
    if userinfo:
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    default_port = 26379 if kind == "sentinel" else 6379
    hosts = tuple(_host_port(item, default_port, url) for item in hostlist.split(",") if item)
    if not hosts:
        raise ConfigError(f"sessions.url {url!r} names no host")
    segments = [unquote(s) for s in parts.path.split("/") if s]
    service, db = None, 0
    if kind == "sentinel":
        if not segments:
            raise ConfigError(
                "sessions.url: a Sentinel URL needs the service name as its path, "
                "as in redis+sentinel://host:26379/mymaster")
        service, segments = segments[0], segments[1:]
    if segments:
        if kind == "cluster" or len(segments) > 1 or not segments[0].isdigit():
            raise ConfigError(f"sessions.url path {parts.path!r} is not allowed here")
        db = int(segments[0])
    query = parse_qs(parts.query)
    return RedisURL(kind, url, hosts, ssl=parts.scheme.startswith("rediss"),
                    username=username, password=password, db=db, service=service,
                    sentinel_password=(query.get("sentinel_password") or [None])[0])


def _host_port(item: str, default_port: int, url: str) -> tuple[str, int]:
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = item.partition(":")
    if not host or (port and not port.isdigit()):
        raise ConfigError(f"sessions.url {url!r}: cannot read host and port from {item!r}")
    return host, int(port) if port else default_port

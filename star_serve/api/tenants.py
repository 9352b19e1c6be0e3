"""Tenants and their API keys: in a JSON file replaced atomically on every change (one replica, the embedded
default), or in Redis when `STAR_REDIS_URL` is set, shared by every replica.

Only a SHA-256 hash of each key is stored: keys are 256-bit random secrets, so a fast hash is enough to
make a leaked file or database useless, and lookups stay O(1). In Redis, every check reads the key's record
(no cache), so a key created or revoked on one replica is valid or refused on every replica from the next
request on; each change is one atomic script, so two replicas creating the same tenant get one 201 and one
409, and a key is never created for a tenant being deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from .errors import ApiError, Conflict, NotFound

KEY_PREFIX = "sk-star-"
CLOSE_TIMEOUT = 5.0  # seconds a shutdown waits for the Redis registry's connections to close

log = logging.getLogger(__name__)


class RegistryUnavailable(ApiError):
    status, type = 503, "unavailable_error"


@dataclass
class KeyRecord:
    id: str
    tenant: str
    hash: str
    created: int


@dataclass(frozen=True)
class TenantInfo:
    name: str
    created: int
    keys: int


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _new_key(tenant: str) -> tuple[KeyRecord, str]:
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return KeyRecord(id="key-" + secrets.token_hex(6), tenant=tenant, hash=_hash(key), created=int(time.time())), key


class TenantRegistry(Protocol):
    async def tenant_of(self, key: str) -> str | None: ...

    async def create_tenant(self, name: str) -> int: ...

    async def delete_tenant(self, name: str) -> None: ...

    async def list_tenants(self) -> list[TenantInfo]: ...

    async def create_key(self, tenant: str) -> tuple[KeyRecord, str]: ...

    async def delete_key(self, tenant: str, key_id: str) -> None: ...

    async def keys_of(self, tenant: str) -> list[KeyRecord]: ...

    async def close(self) -> None: ...


class FileTenantRegistry:
    """One replica's tenants and keys, in `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.tenants: dict[str, int] = {}  # name -> created
        self.keys: dict[str, KeyRecord] = {}  # key id -> record
        self._by_hash: dict[str, KeyRecord] = {}
        if path.exists():
            data = json.loads(path.read_text())
            self.tenants = dict(data["tenants"])
            self.keys = {k["id"]: KeyRecord(**k) for k in data["keys"]}
            self._by_hash = {k.hash: k for k in self.keys.values()}

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
        data = {"tenants": self.tenants, "keys": [asdict(k) for k in self.keys.values()]}
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path)

    async def tenant_of(self, key: str) -> str | None:
        record = self._by_hash.get(_hash(key))  # keyed by the hash: no secret is compared byte by byte
        return None if record is None else record.tenant

    async def create_tenant(self, name: str) -> int:
        with self._lock:
            if name in self.tenants:
                raise Conflict(f"tenant {name!r} exists", "name")
            self.tenants[name] = int(time.time())
            self._save()
            return self.tenants[name]

    async def delete_tenant(self, name: str) -> None:
        with self._lock:
            self._require(name)
            del self.tenants[name]
            for record in [k for k in self.keys.values() if k.tenant == name]:
                del self.keys[record.id]
                del self._by_hash[record.hash]
            self._save()

    async def list_tenants(self) -> list[TenantInfo]:
        counts: dict[str, int] = {}
        for record in self.keys.values():
            counts[record.tenant] = counts.get(record.tenant, 0) + 1
        return [TenantInfo(n, c, counts.get(n, 0)) for n, c in sorted(self.tenants.items())]

    async def create_key(self, tenant: str) -> tuple[KeyRecord, str]:
        with self._lock:
            self._require(tenant)
            record, key = _new_key(tenant)
            self.keys[record.id] = record
            self._by_hash[record.hash] = record
            self._save()
            return record, key

    async def delete_key(self, tenant: str, key_id: str) -> None:
        with self._lock:
            record = self.keys.get(key_id)
            if record is None or record.tenant != tenant:
                raise NotFound(f"no key {key_id!r} for tenant {tenant!r}", "key_id")
            del self.keys[key_id]
            del self._by_hash[record.hash]
            self._save()

    async def keys_of(self, tenant: str) -> list[KeyRecord]:
        self._require(tenant)
        return [k for k in self.keys.values() if k.tenant == tenant]

    async def close(self) -> None:
        return None

    def _require(self, name: str) -> None:
        if name not in self.tenants:
            raise NotFound(f"no tenant {name!r}", "name")


# KEYS[1] tenants hash, KEYS[2] the tenant's key-id set, KEYS[3] key record, KEYS[4] key-id -> hash.
# ARGV: tenant, key id, key hash, created. Returns 0 when the tenant does not exist.
_CREATE_KEY = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[3], 'id', ARGV[2], 'tenant', ARGV[1], 'created', ARGV[4])
redis.call('SET', KEYS[4], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[2])
return 1
"""

# KEYS[1] tenants hash, KEYS[2] the tenant's key-id set; ARGV[1] tenant, ARGV[2] the prefix of key records.
# Returns 0 when the tenant does not exist.
_DELETE_TENANT = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local hash = redis.call('GET', ARGV[2] .. 'id:' .. id)
  if hash then redis.call('DEL', ARGV[2] .. 'key:' .. hash) end
  redis.call('DEL', ARGV[2] .. 'id:' .. id)
end
redis.call('DEL', KEYS[2])
return 1
"""

# KEYS[1] the tenant's key-id set, KEYS[2] key-id -> hash; ARGV[1] key id, ARGV[2] the prefix of key records.
# Returns 0 when the key is not the tenant's.
_DELETE_KEY = """
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return 0 end
local hash = redis.call('GET', KEYS[2])
if hash then redis.call('DEL', ARGV[2] .. 'key:' .. hash) end
redis.call('DEL', KEYS[2])
return 1
"""


class RedisTenantRegistry:
    """Every replica's tenants and keys, under `star:auth:` in Redis."""

    PREFIX = "star:auth:"

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._create_key = redis.register_script(_CREATE_KEY)
        self._delete_tenant = redis.register_script(_DELETE_TENANT)
        self._delete_key = redis.register_script(_DELETE_KEY)

    @classmethod
    def from_url(cls, url: str) -> RedisTenantRegistry:
        return cls(Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0, decode_responses=True))

    @property
    def _tenants(self) -> str:
        return self.PREFIX + "tenants"

    def _key_ids(self, tenant: str) -> str:
        return f"{self.PREFIX}keys-of:{tenant}"

    async def tenant_of(self, key: str) -> str | None:
        async with _available("checking a key"):
            tenant = await self.redis.hget(f"{self.PREFIX}key:{_hash(key)}", "tenant")
        return None if tenant is None else str(tenant)

    async def create_tenant(self, name: str) -> int:
        created = int(time.time())
        async with _available("creating a tenant"):
            if not await self.redis.hsetnx(self._tenants, name, created):
                raise Conflict(f"tenant {name!r} exists", "name")
        return created

    async def delete_tenant(self, name: str) -> None:
        async with _available("deleting a tenant"):
            deleted = await self._delete_tenant(keys=[self._tenants, self._key_ids(name)], args=[name, self.PREFIX])
        if not deleted:
            raise NotFound(f"no tenant {name!r}", "name")

    async def list_tenants(self) -> list[TenantInfo]:
        async with _available("listing tenants"):
            tenants = {str(n): int(c) for n, c in (await self.redis.hgetall(self._tenants)).items()}
            names = sorted(tenants)
            counts = [await self.redis.scard(self._key_ids(name)) for name in names]
        return [TenantInfo(n, tenants[n], c) for n, c in zip(names, counts, strict=True)]

    async def create_key(self, tenant: str) -> tuple[KeyRecord, str]:
        record, key = _new_key(tenant)
        keys = [self._tenants, self._key_ids(tenant), f"{self.PREFIX}key:{record.hash}", f"{self.PREFIX}id:{record.id}"]
        async with _available("creating a key"):
            created = await self._create_key(keys=keys, args=[tenant, record.id, record.hash, record.created])
        if not created:
            raise NotFound(f"no tenant {tenant!r}", "name")
        return record, key

    async def delete_key(self, tenant: str, key_id: str) -> None:
        keys = [self._key_ids(tenant), f"{self.PREFIX}id:{key_id}"]
        async with _available("revoking a key"):
            deleted = await self._delete_key(keys=keys, args=[key_id, self.PREFIX])
        if not deleted:
            raise NotFound(f"no key {key_id!r} for tenant {tenant!r}", "key_id")

    async def keys_of(self, tenant: str) -> list[KeyRecord]:
        async with _available("listing keys"):
            if not await self.redis.hexists(self._tenants, tenant):
                raise NotFound(f"no tenant {tenant!r}", "name")
            records = []
            for key_id in sorted(str(k) for k in await self.redis.smembers(self._key_ids(tenant))):
                hashed = await self.redis.get(f"{self.PREFIX}id:{key_id}")
                fields = await self.redis.hgetall(f"{self.PREFIX}key:{hashed!s}") if hashed else {}
                if fields:
                    records.append(KeyRecord(key_id, tenant, str(hashed), int(fields["created"])))
        return records

    async def close(self) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.redis.aclose()
        except Exception:  # TimeoutError included: a shutdown goes on without a clean close
            log.warning("could not close the tenant registry's Redis connections", exc_info=True)


@contextlib.asynccontextmanager
async def _available(doing: str) -> AsyncIterator[None]:
    """Turns Redis being unreachable into a 503 that says what could not be done."""
    try:
        yield
    except (RedisError, OSError) as e:
        raise RegistryUnavailable(f"the tenant registry (Redis) is unavailable while {doing}") from e
